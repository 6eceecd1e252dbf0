"""shutdown_distributed frees the process group while the interpreter lives, even when a reference
cycle (a trainer holding DDP's reducer or FSDP's mesh) still holds it; left to interpreter
finalization, gloo's worker threads abort the process after a finished run."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import gc, sys, weakref
    import torch.distributed as dist
    from dgss.engine.distributed import shutdown_distributed

    dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
    group = dist.group.WORLD
    alive = weakref.ref(group)

    class Holder:
        pass

    holder = Holder()
    holder.group, holder.me = group, holder  # a cycle: only the cycle collector frees it
    del group, holder
    gc.disable()  # no automatic collection may stand in for the one under test
    shutdown_distributed()
    print("freed" if alive() is None else "alive")
""")


def test_shutdown_frees_a_process_group_held_in_a_reference_cycle(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "freed"
