"""Trainer ranks as the field launches them: torchrun on one machine or on two (here, two torchrun agents on this
one, meeting on 127.0.0.1), and --trainer_ranks R, which starts them through torch's own launcher. The ranks split
every batch, so they end with the weights of one rank; and one that dies stops every process of the run."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from safetensors.torch import load_file

from conftest import (
    ROOT,
    gone_within,
    max_difference,
    processes_with,
    read_run,
    run_script,
    start,
    weights,
    wrapper_script,
)

pytestmark = pytest.mark.usefixtures("every_core")  # two trainer ranks want a core each


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(port: int) -> list[list[str]]:
    """torchrun's flags for node 0 and node 1 of a two-machine run with one rank each, met at 127.0.0.1:port."""
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [[*common, "--node_rank", str(node)] for node in (0, 1)]


def test_torchrun_ranks_on_one_node_or_two_give_the_weights_of_one_rank(tiny_run, cache_dir, model_path, tmp_path):
    """Same global batch and seed: 2 ranks under `torchrun --standalone` with DDP and with FSDP2, and 2 ranks on two
    nodes, end where 1 rank does (the tiny run, which has the same flags), with the gradient norm of the whole model."""
    standalone = ["--standalone", "--nproc_per_node", "2"]
    runs = {"one": weights(tiny_run.run_dir)}
    grad_norms = {"one": [s["objective/grad_norm"] for s in tiny_run.steps]}
    for name, torchrun, flags in [("ddp", standalone, []), ("fsdp", standalone, ["--fsdp"])]:
        result = run_script("async_online_dpo.py", cache_dir, tmp_path / name, *flags, torchrun=torchrun)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 trainer rank(s)" in result.stdout
    node_0, node_1 = two_nodes(free_port())
    other = start("async_online_dpo.py", cache_dir, tmp_path / "two_nodes", tiny=True, torchrun=node_1)
    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "two_nodes", torchrun=node_0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert other.wait(timeout=60) == 0
    assert "2 trainer rank(s)" in result.stdout
    for name in ("ddp", "fsdp", "two_nodes"):
        run_dir, steps, _ = read_run(tmp_path / name)
        runs[name] = weights(run_dir)
        grad_norms[name] = [s["objective/grad_norm"] for s in steps]
    moved = max_difference(runs["one"], load_file(os.path.join(model_path, "model.safetensors")))
    assert moved > 1e-5  # training changed the weights...
    for name in ("ddp", "fsdp", "two_nodes"):
        assert max_difference(runs["one"], runs[name]) < 1e-6 < moved, name  # ...and the ranks did not
        assert grad_norms[name] == pytest.approx(grad_norms["one"], rel=1e-4), name


def test_killing_a_rank_on_the_second_node_stops_the_whole_run(cache_dir, tmp_path):
    """Node 1's rank is killed outright mid-run. Rank 0, on node 0, finds its peer gone at the next collective and
    stops with one sentence; each node's torchrun then stops: no rank, agent or generator is left."""
    marker = uuid.uuid4().hex
    flags = "--num_steps 200 --batch_size 8 --micro_batch_size 4 --eval_every 50 --eval_prompts 16".split()
    node_0, node_1 = two_nodes(free_port())
    agents = [
        start("async_online_dpo.py", cache_dir, tmp_path, *flags, marker=marker, torchrun=t) for t in (node_0, node_1)
    ]
    try:
        for line in agents[0].stdout:  # wait until training is under way
            if line.startswith("step   2/"):
                break
        (rank_1,) = [pid for pid in processes_with(marker) if parent(pid) == agents[1].pid]
        os.kill(rank_1, signal.SIGKILL)
        t = time.time()
        assert gone_within(60, marker)
        stopped_in = time.time() - t
        assert stopped_in < 20, stopped_in
        _, err = agents[0].communicate(timeout=10)
        assert agents[0].returncode != 0 and agents[1].wait(timeout=10) != 0
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors and "trainer rank 0: a rank failed" in errors[0], err[-3000:]
        print(f"the run stopped {stopped_in:.1f} s after rank 1 was killed")
    finally:
        for p in agents:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_dist_timeout_stops_a_run_cleanly(cache_dir, tmp_path):
    """--trainer_ranks 2, the one-machine shortcut, with 2 s to meet: too short, since rank 1 waits for rank 0 while
    rank 0 starts vLLM. The run must stop at the timeout, with a sentence that names the flag, and leave nothing."""
    marker = uuid.uuid4().hex
    flags = "--num_steps 2 --trainer_ranks 2 --dist_timeout 2".split()
    p = start("async_online_dpo.py", cache_dir, tmp_path, *flags, marker=marker)
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert any(line.startswith("error: ") and "--dist_timeout 2s" in line for line in err.splitlines()), err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: trainer rank"), err[-3000:]  # the launcher's last word
    assert gone_within(10, marker)


# NCCL's process-group teardown is not gloo's. destroy_process_group() runs ncclCommFinalize, which waits for this
# rank's own NCCL kernels, and NCCL documents ncclCommDestroy as "an intra-node collective call, which all ranks on
# the same node should call to avoid a hang". gloo's returns at once. So this prelude gives gloo NCCL's teardown:
# destroy_process_group returns only once every rank has called it.
COLLECTIVE_TEARDOWN = """
import time
import torch.distributed as dist
destroy = dist.destroy_process_group
def destroy_as_nccl_does(group=None):
    store = dist.distributed_c10d._get_default_store()
    store.add("ranks in destroy_process_group", 1)
    while store.add("ranks in destroy_process_group", 0) < dist.get_world_size():
        time.sleep(0.1)
    destroy(group)
dist.destroy_process_group = destroy_as_nccl_does
"""

VLLM_FAILS_TO_START = """
def generator_that_fails(*settings):
    raise RuntimeError("vLLM failed to start, on purpose")
A.generator = generator_that_fails
"""


def test_a_generator_that_fails_to_start_ends_every_rank_under_a_collective_teardown(cache_dir, tmp_path):
    """The likeliest first failure on GPUs: vLLM does not start, so rank 0 raises while rank 1 waits for it in a
    broadcast. With NCCL's teardown (above), a rank that left through destroy_process_group would wait there for rank
    1, and rank 1 for rank 0, for --dist_timeout. Every process must be gone within seconds, with the generator's
    error said once."""
    marker = uuid.uuid4().hex
    script = wrapper_script(tmp_path, COLLECTIVE_TEARDOWN + VLLM_FAILS_TO_START)
    flags = "--num_steps 4 --batch_size 8 --micro_batch_size 4 --eval_prompts 8 --dist_timeout 120".split()
    p = start(script, cache_dir, tmp_path, *flags, marker=marker, torchrun=["--standalone", "--nproc_per_node", "2"])
    try:
        _, err = p.communicate(timeout=100)
        assert p.returncode != 0 and "vLLM failed to start, on purpose" in err, err[-3000:]
        assert gone_within(10, marker)
    finally:
        kill_every_process(p, marker)


RANK_1_HANGS_AT_STEP_3 = """
import os, time
steps = 0
check_reloads = A.check_reloads
def check_reloads_or_hang(args, checks):  # every rank calls it once a step, after the batch has reached it
    global steps
    steps += 1
    if os.environ.get("RANK") == "1" and steps == 3:
        while True:  # stuck in Python, elsewhere than its peers: a bug, or a long evaluation
            time.sleep(1)
    check_reloads(args, checks)
A.check_reloads = check_reloads_or_hang
"""


def test_a_rank_waiting_in_a_collective_still_stops_when_told(cache_dir, tmp_path):
    """Rank 1 hangs, so rank 0 waits in a collective for it, inside C++, where no Python signal handler runs. torchrun
    stops the ranks with SIGTERM when one fails; here rank 0 alone gets it. It must end within seconds, with its
    generator, and torchrun then stops rank 1: nothing may wait for --dist_timeout."""
    marker = uuid.uuid4().hex
    script = wrapper_script(tmp_path, RANK_1_HANGS_AT_STEP_3)
    flags = "--num_steps 20 --batch_size 8 --micro_batch_size 4 --eval_prompts 8 --dist_timeout 300".split()
    p = start(script, cache_dir, tmp_path, *flags, marker=marker, torchrun=["--standalone", "--nproc_per_node", "2"])
    try:
        for line in p.stdout:  # step 3 is under way
            if line.startswith("step   2/"):
                break
        time.sleep(5)  # rank 0 is waiting for rank 1
        (rank_0,) = [pid for pid in processes_with(marker) if parent(pid) == p.pid and rank_of(pid) == "0"]
        os.kill(rank_0, signal.SIGTERM)
        t = time.time()
        assert gone_within(60, marker)
        stopped_in = time.time() - t
        assert stopped_in < 20, stopped_in
        assert p.wait(timeout=10) != 0
        print(f"the run stopped {stopped_in:.1f} s after rank 0 was told to")
    finally:
        kill_every_process(p, marker)


def rank_of(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as f:
        variables = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return variables.get(b"RANK", b"").decode()


def kill_every_process(p, marker: str):
    """After a test, whatever it left: torchrun's workers are in sessions of their own, out of reach of its group."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    for pid in processes_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass


def test_the_generator_forms_its_own_group_of_one_under_torchrun(tmp_path):
    """vLLM forms a process group of one inside the generator. vLLM 0.24 meets it at a tcp:// address of its own
    (vllm/v1/executor/uniproc_executor.py, _distributed_args), and torchrun's TORCHELASTIC_USE_AGENT_STORE=True, which
    the generator inherits, tells torch that torchrun's agent hosts every store: torch then only connects, as a client
    (torch/distributed/rendezvous.py, _create_c10d_store), and waits for a server that never comes. The first GPU run
    under torchrun hung there. The generator's settings drop the variable, so such a group forms at once."""
    script = tmp_path / "group_of_one.py"
    script.write_text(
        f"""
import datetime, os, sys
sys.path.insert(0, {ROOT!r})
os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"  # as torchrun sets it for its ranks and their children
import torch.distributed as dist
import async_online_dpo as A
A.set_up_generator_process(A.Args(cache_dir={str(tmp_path / "cache")!r}), sorted(os.sched_getaffinity(0)))
timeout = datetime.timedelta(seconds=10)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout)
print("a group of one")
"""
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "a group of one" in result.stdout, result.stderr[-2000:]
