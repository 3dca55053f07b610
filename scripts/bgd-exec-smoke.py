#!/usr/bin/env python3
"""End-to-end check of scripts/buildgrid-exec.sh (a REAPI execution server + test worker).

    target/venv/bin/python scripts/bgd-exec-smoke.py HOST:PORT DIR

DIR is the one given to buildgrid-exec.sh (its worker.log is checked). Prints what it observes
(stream messages with their stage and timing, operation names, keepalive spacing, cache hit,
NOT_FOUND) and exits non-zero on the first failed expectation. Each run uses a fresh action (a
nonce in the input root), so it can be re-run against the same server.
"""

import io
import sys
import threading
import time
import uuid

import grpc

from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildgrid._protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildgrid._protos.google.longrunning import operations_pb2, operations_pb2_grpc
from buildgrid.server.client.cas import download, upload

STAGES = {v: k for k, v in re_pb2.ExecutionStage.Value.items()}


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        sys.exit(1)


def stage_of(op):
    md = re_pb2.ExecuteOperationMetadata()
    op.metadata.Unpack(md)
    return STAGES[md.stage]


def response_of(op):
    resp = re_pb2.ExecuteResponse()
    op.response.Unpack(resp)
    return resp


def collect(stream, t0, out):
    """Appends (seconds since t0, Operation) for each message; returns the final status code."""
    try:
        for op in stream:
            out.append((time.monotonic() - t0, op))
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def show(label, msgs):
    for t, op in msgs:
        extra = ""
        if op.done:
            r = response_of(op)
            extra = f" exit_code={r.result.exit_code} cached_result={r.cached_result} status={r.status.code}"
        print(f"     {label} +{t:6.3f}s name={op.name!r} stage={stage_of(op)} done={op.done}{extra}")


def main():
    target, dir_ = sys.argv[1], sys.argv[2]
    ch = grpc.insecure_channel(target)
    exe = re_grpc.ExecutionStub(ch)
    ops = operations_pb2_grpc.OperationsStub(ch)
    caps = re_grpc.CapabilitiesStub(ch).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=""))
    ec, cc = caps.execution_capabilities, caps.cache_capabilities
    print(f"     capabilities: exec_enabled={ec.exec_enabled} digest_function={ec.digest_function} "
          f"digest_functions={list(ec.digest_functions)} cache digest_functions={list(cc.digest_functions)} "
          f"action_cache_update_enabled={cc.action_cache_update_capabilities.update_enabled} "
          f"api {caps.low_api_version.major}.{caps.low_api_version.minor}-"
          f"{caps.high_api_version.major}.{caps.high_api_version.minor}")
    check(ec.exec_enabled and ec.digest_function == re_pb2.DigestFunction.SHA256,
          "GetCapabilities: execution enabled, SHA256")

    # --- upload an action: sh -c 'sleep 3; cat in.txt; echo hi > out.txt' ---------------------
    nonce = uuid.uuid4().hex
    with upload(ch, instance="") as up:
        blob = f"input {nonce}\n".encode()
        in_digest = up.put_blob(io.BytesIO(blob))
        root = re_pb2.Directory(files=[re_pb2.FileNode(name="in.txt", digest=in_digest)])
        root_digest = up.put_message(root)
        cmd = re_pb2.Command(
            arguments=["sh", "-c", "sleep 3; cat in.txt; echo hi > out.txt"],
            environment_variables=[re_pb2.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")],
            output_files=["out.txt"], output_paths=["out.txt"],
        )
        cmd_digest = up.put_message(cmd)
        action = re_pb2.Action(command_digest=cmd_digest, input_root_digest=root_digest)
        action_digest = up.put_message(action)
    key = f"{action_digest.hash}/{action_digest.size_bytes}"
    print(f"     action {key}")

    # --- Execute, and WaitExecution on the same operation while it runs ----------------------
    t0 = time.monotonic()
    msgs, wait_msgs, wait_status = [], [], [None]
    stream = exe.Execute(re_pb2.ExecuteRequest(instance_name="", action_digest=action_digest,
                                                skip_cache_lookup=False))
    first = next(stream)
    msgs.append((time.monotonic() - t0, first))
    name = first.name

    def waiter():
        time.sleep(0.5)
        wait_status[0] = collect(exe.WaitExecution(re_pb2.WaitExecutionRequest(name=name)), t0, wait_msgs)

    th = threading.Thread(target=waiter)
    th.start()
    status = collect(stream, t0, msgs)
    th.join()
    print(f"     Execute stream ({len(msgs)} messages, ended {status.name}):")
    show("Execute", msgs)
    print(f"     WaitExecution stream ({len(wait_msgs)} messages, ended {wait_status[0].name}):")
    show("Wait   ", wait_msgs)
    check(status == grpc.StatusCode.OK and msgs[-1][1].done, "Execute stream ends with done=true")
    check(all(op.name == name for _, op in msgs + wait_msgs), f"one operation name throughout: {name!r}")
    check(wait_status[0] == grpc.StatusCode.OK and wait_msgs and wait_msgs[-1][1].done,
          "WaitExecution while running streams updates and ends with done=true")
    executing = [t for t, op in msgs if stage_of(op) == "EXECUTING"]
    gaps = [round(b - a, 3) for a, b in zip(executing, executing[1:])]
    print(f"     EXECUTING messages at {[round(t, 3) for t in executing]} (gaps {gaps})")
    resp = response_of(msgs[-1][1])
    check(resp.status.code == 0 and resp.result.exit_code == 0 and not resp.cached_result,
          "first ExecuteResponse: status OK, exit code 0, cached_result=false")
    files = {f.path: f for f in resp.result.output_files}
    check(list(files) == ["out.txt"], f"output_files: {list(files)}")
    with download(ch, instance="") as dl:
        out = dl.get_blob(files["out.txt"].digest)
        stdout = dl.get_blob(resp.result.stdout_digest)
    check(out == b"hi\n", f"out.txt in the CAS: {out!r}")
    check(stdout == blob, f"stdout in the CAS: {stdout!r}")
    with open(f"{dir_}/worker.log") as f:
        n = sum(1 for line in f if line.strip() == f"executed {key}")
    check(n == 1, f"worker.log has {n} line for the action")

    # --- Operations service -----------------------------------------------------------------
    got = ops.GetOperation(operations_pb2.GetOperationRequest(name=name))
    check(got.done and got.name == name, "GetOperation on the finished operation: done")

    # --- second Execute, skip_cache_lookup=false: action cache hit ---------------------------
    t0 = time.monotonic()
    msgs2 = []
    status = collect(exe.Execute(re_pb2.ExecuteRequest(instance_name="", action_digest=action_digest)),
                     t0, msgs2)
    show("Cached ", msgs2)
    resp2 = response_of(msgs2[-1][1])
    check(status == grpc.StatusCode.OK and resp2.cached_result and resp2.result.exit_code == 0,
          f"second Execute: cache hit ({len(msgs2)} message(s), new name {msgs2[-1][1].name != name})")

    # --- WaitExecution / GetOperation on unknown names -----------------------------------------
    for bad in (str(uuid.uuid4()), "/" + str(uuid.uuid4()), "no-such-operation"):
        try:
            list(exe.WaitExecution(re_pb2.WaitExecutionRequest(name=bad)))
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        print(f"     WaitExecution({bad!r}) -> {code.name}: {details}")
        check(code == grpc.StatusCode.NOT_FOUND, "WaitExecution on an unknown name gives NOT_FOUND")
    try:
        ops.GetOperation(operations_pb2.GetOperationRequest(name=str(uuid.uuid4())))
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    print(f"     GetOperation(unknown) -> {code.name}: {details}")

    # --- third Execute, skip_cache_lookup=true: runs again ------------------------------------
    msgs3 = []
    collect(exe.Execute(re_pb2.ExecuteRequest(instance_name="", action_digest=action_digest,
                                              skip_cache_lookup=True)), time.monotonic(), msgs3)
    resp3 = response_of(msgs3[-1][1])
    with open(f"{dir_}/worker.log") as f:
        n = sum(1 for line in f if line.strip() == f"executed {key}")
    check(not resp3.cached_result and n == 2, "skip_cache_lookup=true: executed again (2 lines)")
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
