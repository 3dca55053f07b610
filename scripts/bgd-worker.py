#!/usr/bin/env python3
"""A small REAPI test worker for BuildGrid's Bots API (BuildGrid 0.4.4 ships none).

Run by scripts/buildgrid-exec.sh with target/venv/bin/python (it imports the protobuf modules and
CAS client that ship inside the buildgrid package):

    bgd-worker.py --remote 127.0.0.1:PORT --dir DIR [--instance NAME] [--capacity N] [--bot-id ID]

It opens one bot session (CreateBotSession), then loops on UpdateBotSession: the server hands it
leases whose payload is the Action; for each one it fetches the Command and the input root from
the CAS, runs the command in DIR/work/<lease id> with exactly the Command's arguments and
environment, uploads the outputs (output_paths, or the older output_files/output_directories),
stdout and stderr, and returns the ActionResult in the lease (state COMPLETED). The scheduler then
completes the operation and, on exit code 0, fills the ActionCache.

Files in DIR:
  worker.log    one line "executed <action hash>/<size>" per command it starts (tests count
                them to prove an action ran exactly once); nothing else is written there
  worker.ready  written once the bot session exists (buildgrid-exec.sh waits for it)
  work/         per-lease execution roots, removed when the lease ends
Diagnostics go to stderr (buildgrid-exec.sh sends them to DIR/worker.stderr.log).

Protocol notes (BuildGrid 0.4.4, buildgrid/server/bots/service.py and scheduler/impl.py):
- UpdateBotSession long-polls while the session has free capacity and nothing changed: the server
  waits 0.8 x min(client deadline, bot-session-keepalive-timeout) for an assignment. A deadline
  under 3.75 s (NETWORK_TIMEOUT 3 s / 0.8) makes it answer at once, which CreateBotSession uses.
- The session must be refreshed within bot-session-keepalive-timeout, or the reaper closes it and
  requeues its jobs; at full capacity the server answers at once, so we heartbeat every 10 s.
- Leases arrive ACTIVE; we echo them ACTIVE while running (a heartbeat), then send them back
  COMPLETED with status and result = Any(ActionResult). A lease the server stops listing has been
  cancelled (or given to another bot): its process group is killed and nothing is reported.
- Status INTERNAL or UNAVAILABLE on a lease makes BuildGrid retry the job (up to 5 tries), so
  worker-side failures are reported as UNKNOWN / FAILED_PRECONDITION, which end the operation.
- When a lease finishes during a long poll, the poll is cancelled and the completion is sent at
  once (a cancelled poll changes nothing server-side: it skips its post-wait synchronization, and
  any job assigned meanwhile is listed in the next answer because the session version moved on).
"""

import argparse
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildgrid._protos.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc, worker_pb2
from buildgrid._protos.google.rpc import code_pb2
from buildgrid.server.client.cas import download, upload

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
CREATE_DEADLINE = 3.0  # < 3.75 s: CreateBotSession answers at once instead of waiting for work
POLL_DEADLINE = 30.0  # long poll; the server answers after ~24 s (0.8 x 30) if nothing happens
HEARTBEAT = 10.0  # at full capacity; well inside bot-session-keepalive-timeout (60 s)
BOT_STATUS_OK = 1  # google.devtools.remoteworkers.v1test2.BotStatus.OK

ACTIVE = bots_pb2.LeaseState.Value("ACTIVE")
PENDING = bots_pb2.LeaseState.Value("PENDING")
COMPLETED = bots_pb2.LeaseState.Value("COMPLETED")


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} bgd-worker[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def now_ts():
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class Stopped(Exception):
    pass


class Run:
    """One lease: executed on its own thread."""

    def __init__(self, worker, lease):
        self.worker = worker
        self.lease_id = lease.id
        self.payload = lease.payload
        self.cancelled = False
        self.proc = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.main, name=f"lease-{lease.id}", daemon=True)

    def cancel(self):
        with self.lock:
            self.cancelled = True
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def main(self):
        status_code, message, result = code_pb2.UNKNOWN, "", None
        try:
            status_code, message, result = self.execute()
        except Stopped:
            status_code, message = code_pb2.CANCELLED, "lease cancelled"
        except Exception as e:  # report, do not kill the worker
            log(f"lease {self.lease_id}: {traceback.format_exc()}")
            status_code, message = code_pb2.UNKNOWN, f"bgd-worker: {type(e).__name__}: {e}"
        self.worker.finished(self, status_code, message, result)

    def check_cancelled(self):
        if self.cancelled or self.worker.stopping.is_set():
            raise Stopped()

    def execute(self):
        w = self.worker
        md = re_pb2.ExecutedActionMetadata(worker=w.bot_id)
        md.input_fetch_start_timestamp.CopyFrom(now_ts())
        root = os.path.join(w.dir, "work", self.lease_id.replace("/", "_"))
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        try:
            with download(w.channel, instance=w.instance) as dl:
                if self.payload.Is(re_pb2.Action.DESCRIPTOR):
                    action = re_pb2.Action()
                    self.payload.Unpack(action)
                    action_digest = re_pb2.Digest()
                    action_digest.CopyFrom(w.digest_of(action.SerializeToString()))
                else:  # older schedulers send the Action's digest
                    action_digest = re_pb2.Digest()
                    self.payload.Unpack(action_digest)
                    action = dl.get_message(action_digest, re_pb2.Action())
                command = dl.get_message(action.command_digest, re_pb2.Command())
                if command is None or not command.arguments:
                    return code_pb2.FAILED_PRECONDITION, "Command missing from the CAS or empty", None
                self.check_cancelled()
                try:
                    dl.download_directory(action.input_root_digest, root)
                except Exception as e:
                    return code_pb2.FAILED_PRECONDITION, f"cannot fetch the input root: {e}", None
            md.input_fetch_completed_timestamp.CopyFrom(now_ts())

            cwd = os.path.join(root, command.working_directory)
            outputs = list(command.output_paths) or (list(command.output_files) + list(command.output_directories))
            for out in outputs:  # REAPI: the worker creates the outputs' parent directories
                os.makedirs(os.path.dirname(os.path.join(cwd, out)), exist_ok=True)
            os.makedirs(cwd, exist_ok=True)
            env = {v.name: v.value for v in command.environment_variables}
            stdout_path, stderr_path = os.path.join(root, ".stdout"), os.path.join(root, ".stderr")
            timeout = action.timeout.ToTimedelta().total_seconds() or None  # 0: no timeout

            self.check_cancelled()
            w.record_execution(action_digest)
            md.execution_start_timestamp.CopyFrom(now_ts())
            timed_out = False
            with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
                with self.lock:
                    self.check_cancelled()
                    try:
                        # Own process group (in the worker's session): cancel/stop kill the lot.
                        self.proc = subprocess.Popen(
                            list(command.arguments), cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=so, stderr=se, process_group=0,
                        )
                    except OSError as e:
                        se.write(f"bgd-worker: cannot run {command.arguments[0]!r}: {e}\n".encode())
                        self.proc = None
                if self.proc is None:
                    exit_code = 127
                else:
                    try:
                        exit_code = self.proc.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        timed_out = True
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        exit_code = self.proc.wait()
                    try:  # whatever it left behind in its group
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            md.execution_completed_timestamp.CopyFrom(now_ts())
            self.check_cancelled()
            if exit_code < 0:  # killed by a signal: report it the way shells do
                exit_code = 128 - exit_code

            md.output_upload_start_timestamp.CopyFrom(now_ts())
            result = re_pb2.ActionResult(exit_code=exit_code)
            with upload(w.channel, instance=w.instance) as up:
                for out in outputs:
                    self.collect_output(up, cwd, out, command, result)
                result.stdout_digest.CopyFrom(up.upload_file(stdout_path, queue=True))
                result.stderr_digest.CopyFrom(up.upload_file(stderr_path, queue=True))
                up.flush()
            md.output_upload_completed_timestamp.CopyFrom(now_ts())
            result.execution_metadata.CopyFrom(md)
            if timed_out:
                return code_pb2.DEADLINE_EXCEEDED, f"action timed out after {timeout} s", result
            return code_pb2.OK, "", result
        finally:
            shutil.rmtree(root, ignore_errors=True)

    @staticmethod
    def collect_output(up, cwd, out, command, result):
        path = os.path.join(cwd, out)
        if os.path.islink(path):
            target = os.readlink(path)
            result.output_symlinks.add(path=out, target=target)
            # Older clients (REAPI < 2.1) read the per-kind lists.
            if out in command.output_directories:
                result.output_directory_symlinks.add(path=out, target=target)
            else:
                result.output_file_symlinks.add(path=out, target=target)
        elif os.path.isfile(path):
            digest = up.upload_file(path, queue=True)
            executable = bool(os.stat(path).st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
            result.output_files.add(path=out, digest=digest, is_executable=executable)
        elif os.path.isdir(path):
            result.output_directories.add(path=out, tree_digest=up.upload_tree(path, queue=True))
        # A missing output is simply not listed (REAPI: the client decides whether that is an error).


class Worker:
    def __init__(self, args):
        self.dir = os.path.abspath(args.dir)
        self.instance = args.instance
        self.capacity = args.capacity
        self.bot_id = args.bot_id
        self.channel = grpc.insecure_channel(args.remote, options=CHANNEL_OPTIONS)
        self.stub = bots_pb2_grpc.BotsStub(self.channel)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.running = {}  # lease id -> Run
        self.completed = {}  # lease id -> Lease (COMPLETED), until the server has taken it
        self.session = None
        self.current = None  # the UpdateBotSession call in flight
        self.log_path = os.path.join(self.dir, "worker.log")
        os.makedirs(os.path.join(self.dir, "work"), exist_ok=True)

    @staticmethod
    def digest_of(blob):
        import hashlib

        return re_pb2.Digest(hash=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob))

    def record_execution(self, digest):
        with self.lock, open(self.log_path, "a") as f:
            f.write(f"executed {digest.hash}/{digest.size_bytes}\n")

    def finished(self, run, status_code, message, result):
        with self.lock:
            self.running.pop(run.lease_id, None)
            if run.cancelled or self.stopping.is_set():
                log(f"lease {run.lease_id}: dropped (cancelled)")
            else:
                lease = bots_pb2.Lease(id=run.lease_id, state=COMPLETED)
                lease.status.code = status_code
                lease.status.message = message
                if result is not None:
                    lease.result.Pack(result)
                self.completed[run.lease_id] = lease
                log(f"lease {run.lease_id}: done, status {status_code}"
                    + (f", exit code {result.exit_code}" if result is not None else f": {message}"))
        self.wake.set()

    def new_session(self):
        worker = worker_pb2.Worker()
        worker.configs.add(key="capacity", value=str(self.capacity))
        device = worker.devices.add(handle=self.bot_id)
        # Matched against actions' platform properties OSFamily and ISA (buildgrid-exec.sh's
        # property set); an action that sets neither matches any bot.
        for key, value in (("OSFamily", "linux"), ("OSFamily", "Linux"), ("ISA", "x86-64")):
            device.properties.add(key=key, value=value)
        session = bots_pb2.BotSession(bot_id=self.bot_id, status=BOT_STATUS_OK, worker=worker)
        delay = 0.1
        while not self.stopping.is_set():
            try:
                self.session = self.stub.CreateBotSession(
                    bots_pb2.CreateBotSessionRequest(parent=self.instance, bot_session=session),
                    timeout=CREATE_DEADLINE,
                )
                del self.session.leases[:]  # none: it answered without waiting for work
                log(f"bot session {self.session.name} (bot id {self.bot_id}, capacity {self.capacity})")
                return
            except grpc.RpcError as e:
                log(f"CreateBotSession: {e.code().name}: {e.details()}; retrying")
                self.stopping.wait(delay)
                delay = min(delay * 2, 2.0)

    def drop_all_leases(self):
        with self.lock:
            runs = list(self.running.values())
            self.completed.clear()
        for run in runs:
            run.cancel()

    def run(self, ready_file):
        self.new_session()
        if ready_file and not self.stopping.is_set():
            with open(ready_file + ".tmp", "w") as f:
                f.write(self.session.name + "\n")
            os.rename(ready_file + ".tmp", ready_file)
        backoff = 0.1
        while not self.stopping.is_set():
            self.wake.clear()  # before the snapshot: a lease finishing after it wakes us up
            with self.lock:
                active_ids = list(self.running)
                sent_completed = dict(self.completed)
            leases = [bots_pb2.Lease(id=i, state=ACTIVE) for i in active_ids] + list(sent_completed.values())
            del self.session.leases[:]
            self.session.leases.extend(leases)
            t_sent = time.monotonic()
            fut = self.stub.UpdateBotSession.future(
                bots_pb2.UpdateBotSessionRequest(name=self.session.name, bot_session=self.session),
                timeout=POLL_DEADLINE,
            )
            self.current = fut
            # Only the current call may wake us: a cancelled one's callback can run late.
            fut.add_done_callback(lambda f: self.wake.set() if f is self.current else None)
            self.wake.wait()
            if not fut.done():
                fut.cancel()  # a lease finished or we are stopping: resend at once
                continue
            try:
                reply = fut.result()
            except grpc.FutureCancelledError:
                continue
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.CANCELLED and fut.cancelled():
                    continue  # ours (a lease finished meanwhile)
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    log(f"UpdateBotSession: {code.name}: {e.details()}; retrying in {backoff:.1f} s")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                # The server no longer knows this session (expired, or taken over by a new one
                # with our bot id): its jobs were requeued, so drop ours and start afresh.
                log(f"UpdateBotSession: {code.name}: {e.details()}; new session")
                self.drop_all_leases()
                self.new_session()
                continue
            backoff = 0.1
            self.session = reply
            got = {lease.id: lease for lease in reply.leases}
            started = 0
            self.wake.clear()  # set by the reply's callback; completions are checked below
            with self.lock:
                for lease_id in sent_completed:  # the server has them now
                    self.completed.pop(lease_id, None)
                for lease_id in active_ids:  # sent as ACTIVE, no longer listed: cancelled
                    run = self.running.get(lease_id)
                    if lease_id not in got and run is not None:
                        log(f"lease {lease_id}: no longer assigned; killing it")
                        run.cancel()
                for lease_id, lease in got.items():
                    if lease_id in self.running or lease_id in self.completed or lease_id in sent_completed:
                        continue
                    if lease.state not in (ACTIVE, PENDING):
                        continue
                    log(f"lease {lease_id}: assigned")
                    run = Run(self, lease)
                    self.running[lease_id] = run
                    run.thread.start()
                    started += 1
                at_capacity = len(self.running) >= self.capacity
                pending = bool(self.completed)
            if started or pending:
                continue  # report new leases ACTIVE (acks them) / finished ones right away
            if at_capacity:
                self.wake.wait(HEARTBEAT)  # the server would answer at once: just heartbeat
            elif time.monotonic() - t_sent < 0.05:
                self.wake.wait(0.05)  # never spin if the server answered without waiting
        self.drop_all_leases()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--remote", required=True, help="HOST:PORT of the Bots service")
    p.add_argument("--dir", required=True)
    p.add_argument("--instance", default="")
    p.add_argument("--capacity", type=int, default=int(os.environ.get("WORKER_CAPACITY", "4")))
    p.add_argument("--bot-id", default="bgd-test-worker")
    p.add_argument("--ready-file")
    args = p.parse_args()
    worker = Worker(args)

    def on_signal(signum, _frame):
        log(f"signal {signum}: stopping")
        worker.stopping.set()
        worker.wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run(args.ready_file)
    # Running leases were killed; their threads end promptly (no more RPCs are made for them).
    log("stopped")


if __name__ == "__main__":
    main()
