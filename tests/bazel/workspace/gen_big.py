"""Writes argv[1] MiB of seeded pseudo-random bytes to stdout: the same on every run and
machine, incompressible, and about 0.3 s per 100 MiB."""
import random
import sys

rng = random.Random(0)
for _ in range(int(sys.argv[1])):
    sys.stdout.buffer.write(rng.randbytes(1 << 20))
