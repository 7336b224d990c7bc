"""The fault campaign: kills, signals, a full disk, hostile files, corrupt data and bad invocations against a
tiny run on the CPU (ResNet-18 of width 4, 250/100 images, batches of 25, 4 epochs, a checkpoint every
epoch). Whatever happens, nothing is lost: the folder ends equal to an uninterrupted run's, and every
failure is one line on stderr."""
import errno
import hashlib
import json
import os
import pickle
import queue
import random
import signal
import subprocess
import struct
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import torch

import cifar100_resnet as cr
from conftest import DETERMINISTIC_COLUMNS, FAULT_PAUSE_ENV, MODULE, metric_rows, write_official_layout

RUN_FLAGS = ["--arch", "resnet18", "--width", "4", "--limit-train", "250", "--limit-test", "100", "--batch-size",
             "25", "--epochs", "4", "--checkpoint-every", "1", "--device", "cpu", "--no-download", "--log-every", "1"]
STEPS = 10  # per epoch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_data")
    write_official_layout(root, n_train=250, n_test=100)
    return root


def run_args(data_dir, out_dir, *extra) -> list:
    return [*RUN_FLAGS, "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="session")
def reference(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run: what every faulted run must end as."""
    out = tmp_path_factory.mktemp("faults_reference") / "run"
    assert cr.main(run_args(data_dir, out, "--quiet")) == 0
    return out


# ----------------------------------------------------------------------------------------------------------
# Comparing run folders


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_equal_values(a, b, where: str):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def deterministic_state(ckpt: dict) -> dict:
    """Everything a checkpoint holds but its run's identity and the timing columns of its history."""
    state = {k: v for k, v in ckpt.items() if k not in ("run_id", "history", "config")}
    state["config"] = {k: v for k, v in ckpt["config"].items() if k not in ("out_dir", "quiet", "log_every")}
    state["history"] = [{k: row[k] for k in DETERMINISTIC_COLUMNS} for row in ckpt.get("history", [])]
    return state


def assert_same_run(folder: Path, reference: Path):
    """The same files as the uninterrupted run, with the same contents, and no temporary file."""
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    assert not [n for n in names if n.endswith(cr.TEMP_SUFFIX)]
    for name in names:
        if name.endswith(".pt"):
            ours, theirs = load(folder / name), load(reference / name)
            assert_equal_values(deterministic_state(ours), deterministic_state(theirs), name)
    ours, theirs = metric_rows(folder), metric_rows(reference)
    assert [[r[k] for k in DETERMINISTIC_COLUMNS] for r in ours] == \
        [[r[k] for k in DETERMINISTIC_COLUMNS] for r in theirs]
    run_id = load(folder / "last.pt")["run_id"]
    assert run_id and all(load(folder / n)["run_id"] == run_id for n in names if n.endswith(".pt"))


# ----------------------------------------------------------------------------------------------------------
# Kills and signals, one subprocess after another


# Each attempt is a fork of one process that has already imported torch (and torch._dynamo, which the
# optimiser's constructor imports: 3-4 s per fresh process on 2 cores), so that 30 attempts take seconds.
FORK_SERVER = r"""
import json, os, sys
import cifar100_resnet, torch._dynamo
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout.reconfigure(line_buffering=True)
        os.environ.update(request["env"])
        code = 1
        try:
            code = cifar100_resnet.main(request["argv"])
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkServer:
    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(MODULE))

    def run(self, argv: list, fault_point: str, trigger, sig) -> tuple:
        """Run main(argv) in a fork; send `sig` when `trigger` (a text of its output, or seconds) comes.
        Returns (exit code, or -signal; its output; whether the trigger came)."""
        self.count += 1
        log = self.logs / f"attempt{self.count}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": {FAULT_PAUSE_ENV: fault_point},
                                          "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        done = queue.Queue()
        threading.Thread(target=lambda: done.put(json.loads(self.proc.stdout.readline())["code"])).start()
        started, fired = time.monotonic(), False
        while done.empty():
            if not fired and trigger is not None:
                output = log.read_text() if log.exists() else ""
                if (trigger in output) if isinstance(trigger, str) else time.monotonic() - started > trigger:
                    os.kill(pid, sig)
                    fired = True
            time.sleep(0.005)
        return done.get(), log.read_text(), fired

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def interrupt(server: ForkServer, data_dir, out, trigger, sig) -> tuple:
    """Run (resuming if the folder holds a run) until `trigger`: a write step to pause at ("written best.pt"),
    a progress text ("step 3/10") or seconds after the start; then send `sig`."""
    resume = (out / "config.json").exists() or (out / "last.pt").exists()
    argv = [*run_args(data_dir, out), *(["--resume"] if resume else [])]
    if isinstance(trigger, str) and not trigger.startswith("step"):
        return server.run(argv, trigger, f"fault point: {trigger}", sig)
    return server.run(argv, "", f" {trigger} " if isinstance(trigger, str) else trigger, sig)


WRITE_STEPS = [f"{step} {name}" for name in ("last.pt", "best.pt", "ckpt_ep", "metrics.csv")
               for step in ("opened", "written", "renamed")]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill chain forks attempts from one process (POSIX)")
def test_kills_and_signals_at_any_moment_end_in_the_uninterrupted_runs_files(data_dir, reference, tmp_path):
    out, server = tmp_path / "run", ForkServer(tmp_path)
    rng = random.Random(9)
    step = lambda: f"step {rng.randint(1, STEPS - 1)}/10"  # noqa: E731
    # kills that cannot let the run advance come first, so that all of them land before it ends
    plan = [(f"{point} config.json", signal.SIGKILL) for point in ("opened", "written", "renamed")]
    plan += [("step 4/10", signal.SIGKILL)]  # before the first checkpoint: --resume starts the run again
    plan += [(f"{point} last.pt", signal.SIGKILL) for point in ("opened", "written", "renamed")]  # epoch 1
    plan += [(f"{point} {name}", signal.SIGKILL) for name in ("best.pt", "ckpt_ep", "metrics.csv")
             for point in ("opened", "written", "renamed")]  # each step of each derived file, while repairing
    plan += [(rng.uniform(0.02, 0.3), signal.SIGKILL) for _ in range(4)]  # anywhere early: reading, training
    plan += [(step(), signal.SIGINT),  # inside epoch 2
             ("written ckpt_ep", signal.SIGKILL),  # epoch 2's files, on the background writer
             ("opened metrics.csv", signal.SIGINT),  # while repairing them: stops after the next step
             ("written last.pt", signal.SIGTERM),  # epoch 3's commit; stops in epoch 4
             (rng.uniform(0.02, 0.2), signal.SIGKILL), (step(), signal.SIGTERM), ("step 10/10", signal.SIGKILL)]
    kills = 0
    for trigger, sig in plan:
        code, output, fired = interrupt(server, data_dir, out, trigger, sig)
        assert fired, f"the run ended before {trigger!r} came: {output}"
        expected = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
        assert code == expected, (trigger, output)
        if sig != signal.SIGKILL:  # a stop is orderly: last.pt written, nothing half-done left behind
            assert (out / "last.pt").exists() and not list(out.glob(f"*{cr.TEMP_SUFFIX}"))
        kills += sig == signal.SIGKILL
    assert kills == 23 and len(plan) == 27
    while not (out / "last.pt").exists() or load(out / "last.pt")["epoch"] < 4 or \
            load(out / "last.pt")["partial_epoch"] is not None:
        code, output, _ = interrupt(server, data_dir, out, None, signal.SIGKILL)
        assert code == 0, output
    assert_same_run(out, reference)

    # resuming the finished run changes nothing
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, output, _ = interrupt(server, data_dir, out, None, signal.SIGKILL)
    assert code == 0 and "is complete: 4 of 4 epochs" in output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    server.close()


# ----------------------------------------------------------------------------------------------------------
# A full disk at each kind of write


class FullDisk:
    """A file whose writes fail as they do on a disk that fills up while it is written: the first bytes land,
    then ENOSPC. torch.save meets that OSError inside its C++ writer and raises a RuntimeError of its own
    ("unexpected pos"), as it does on a real full disk."""

    def __init__(self, f, room: int = 100):
        self.name, self.room = f.name, room

    def write(self, data):
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def flush(self):
        pass


def fill_disk_at(monkeypatch, name: str, occurrence: int = 1):
    """From the `occurrence`-th write of a file whose name starts with `name` on, every write fails with
    ENOSPC (the disk stays full)."""
    real = cr._serialize
    seen = []

    def serialize(obj, f):
        if os.path.basename(f.name).lstrip(".").startswith(name):
            seen.append(1)
        real(obj, FullDisk(f) if len(seen) >= occurrence else f)

    monkeypatch.setattr(cr, "_serialize", serialize)


def interrupt_at_step(monkeypatch, step: int):
    """SIGINT to this process during the `step`-th training step (as a user's Ctrl-C)."""
    real = cr.Trainer._step
    calls = []

    def step_then_signal(self, *args):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)

    monkeypatch.setattr(cr.Trainer, "_step", step_then_signal)


@pytest.mark.parametrize("name, occurrence, ctrl_c_at", [
    ("config.json", 1, None), ("last.pt", 3, None), ("best.pt", 2, None), ("ckpt_ep", 2, None),
    ("metrics.csv", 2, None), ("last.pt", 3, 25),  # the last: Ctrl-C in epoch 3 while the disk is full
])
def test_a_full_disk_is_one_line_naming_the_file_and_the_run_resumes_once_there_is_space(
        data_dir, reference, tmp_path, monkeypatch, capsys, name, occurrence, ctrl_c_at):
    out = tmp_path / "run"
    fill_disk_at(monkeypatch, name, occurrence)
    if ctrl_c_at:
        interrupt_at_step(monkeypatch, ctrl_c_at)
    assert cr.main(run_args(data_dir, out, "--quiet")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: could not write {out}{os.sep}{name}"), err
    assert "No space left on device" in err[0] and "free some space" in err[0]
    assert not list(out.glob(f"*{cr.TEMP_SUFFIX}")) if out.exists() else True
    if (out / "last.pt").exists():  # the files committed before the failure are whole and agree
        last = load(out / "last.pt")
        assert f"last.pt holds epoch {last['epoch']}" in err[0]
        assert [int(r["epoch"]) for r in metric_rows(out)] in ([*range(1, last["epoch"] + 1)],
                                                               [*range(1, last["epoch"])])
    else:
        assert "no checkpoint was written" in err[0]
    monkeypatch.undo()
    resume = ["--resume"] if (out / "config.json").exists() else []
    assert cr.main(run_args(data_dir, out, "--quiet", *resume)) == 0
    assert_same_run(out, reference)


def test_running_out_of_memory_is_one_line_exit_1_and_the_run_resumes_from_its_last_checkpoint(
        data_dir, reference, tmp_path, monkeypatch, capsys):
    # a GPU out of memory in epoch 3 (step 25 of 40): the exception torch raises there, from inside the step
    real, calls = cr.Trainer._step, []

    def step_out_of_memory(self, *args):
        calls.append(1)
        if len(calls) == 25:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                              "capacity of 79.19 GiB of which 1.06 GiB is free. Including non-PyTorch "
                                              "memory, this process has 78.12 GiB memory in use.")
        return real(self, *args)

    out = tmp_path / "run"
    monkeypatch.setattr(cr.Trainer, "_step", step_out_of_memory)
    assert cr.main(run_args(data_dir, out, "--quiet")) == 1
    assert one_error_line(capsys, 1, 1) == (
        "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): a smaller --batch-size or "
        "--eval-batch-size needs less; a run folder keeps its last checkpoint")
    assert load(out / "last.pt")["epoch"] == 2 and not list(out.glob(f"*{cr.TEMP_SUFFIX}"))
    monkeypatch.undo()
    assert cr.main(run_args(data_dir, out, "--quiet", "--resume")) == 0
    assert_same_run(out, reference)
    # on the CPU torch says so in a plain RuntimeError: a real one, a first stage of 10^6 channels (36 TB)
    wide = tmp_path / "wide"
    assert cr.main(run_args(data_dir, wide, "--quiet", "--width", "1000000")) == 1
    message = one_error_line(capsys, 1, 1)
    assert message.startswith("error: out of memory (") and "can't allocate memory" in message, message
    assert not wide.exists()


@pytest.mark.parametrize("message, cause", [
    ("[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: you tried to allocate "
     "36000000000000 bytes.", "[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: "
     "you tried to allocate 36000000000000 bytes"),  # the CPU on Windows
    ("MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). Tried "
     "to allocate 2.00 GB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit",
     "MPS backend out of memory (MPS allocated: 17.50 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
     "Tried to allocate 2.00 GB on private pool"),  # Apple's GPU before torch 2.5 (from 2.5: torch's class)
])
def test_out_of_memory_said_in_a_plain_runtime_error_is_one_line_too(data_dir, tmp_path, monkeypatch, capsys,
                                                                     message, cause):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(cr, "train", out_of_memory)
    assert cr.main(run_args(data_dir, tmp_path / "run", "--quiet")) == 1
    assert one_error_line(capsys, 1, 1) == (f"error: out of memory ({cause}): a smaller --batch-size or "
                                            f"--eval-batch-size needs less; a run folder keeps its last checkpoint")


def test_under_torchrun_a_process_that_runs_out_of_memory_says_so_itself(data_dir, tmp_path, monkeypatch, capsys):
    # process 3 of 4, not the first of its machine: process 0 speaks for the run, but out of memory is this
    # process's own failure, which process 0 only sees as a process lost (and it said nothing of it before)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(cr, "join_torchrun", lambda device: False)  # (the group itself is test_distributed's)
    # as in torch 2.3 and 2.4 (setup.cfg: torch>=2.3), which have only torch.cuda's (from 2.5 on, the same class)
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total "
                                          "capacity of 79.19 GiB of which 1.06 GiB is free.")

    monkeypatch.setattr(cr, "train", out_of_memory)
    assert cr.main(run_args(data_dir, tmp_path / "run", "--quiet")) == 1
    assert capsys.readouterr().err == (
        "[process 3] error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): a smaller --batch-size "
        "or --eval-batch-size needs less; a run folder keeps its last checkpoint\n")
    assert cr.main(run_args(data_dir, tmp_path / "run", "--no-such-flag")) == 2  # bad input: process 0 says it
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------------
# Divergence: no checkpoint ever holds non-finite values, and the message says what is on disk


def test_lr_far_too_high_says_no_checkpoint_was_written(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cr.main(run_args(data_dir, out, "--quiet", "--lr", "1e6")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and f"no checkpoint was written to {out}" in err[0], err
    assert not (out / "last.pt").exists()


def test_non_finite_batchnorm_statistics_are_never_checkpointed(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real = cr.Trainer.evaluate

    def evaluate(self, *args, **kwargs):  # in epoch 3 a running variance overflows, the loss stays finite
        if self.epoch == 3:
            self.model.layer2[0].bn1.running_var[0] = float("inf")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cr.Trainer, "evaluate", evaluate)
    assert cr.main(run_args(data_dir, out, "--quiet")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights became non-finite in epoch 3 (layer2.0.bn1.running_var)" in err[0], err
    assert "last.pt holds epoch 2" in err[0]
    last = load(out / "last.pt")
    assert last["epoch"] == 2 and all(torch.isfinite(t).all() for t in last["model"].values()
                                      if t.is_floating_point())
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "ckpt_ep1.pt", "ckpt_ep2.pt", "config.json",
                                                     "last.pt", "metrics.csv"]


# ----------------------------------------------------------------------------------------------------------
# Hostile and malformed files


class Payload:
    """Unpickling this creates the marker file: what a malicious file would do instead (through open, or through
    os.system, whose module torch's safe loader blocks by name)."""

    def __init__(self, marker: Path, through: str = "open"):
        self.marker, self.through = marker, through

    def __reduce__(self):
        return (open, (str(self.marker), "w")) if self.through == "open" else (os.system, (f"touch {self.marker}",))


def one_error_line(capsys, code: int, expected: int = 2) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "", captured.out
    assert code == expected and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


@pytest.fixture(scope="session")
def finished_run(data_dir, reference) -> Path:
    return reference


def hostile_checkpoint(path: Path, marker: Path, through: str = "open"):
    torch.save({"format": "cifar100_resnet", "epoch": 1, "model": {}, "payload": Payload(marker, through)}, path)


@pytest.mark.parametrize("through", ["open", "os.system"])
@pytest.mark.parametrize("how", ["--resume --out-dir", "--resume PATH", "eval", "eval RUN_DIR", "eval best.pt"])
def test_a_hostile_checkpoint_runs_nothing_and_is_one_line(data_dir, tmp_path, capsys, how, through):
    marker, run = tmp_path / "marker", tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"run_id": "x"}\n')
    hostile_checkpoint(run / "last.pt", marker, through)
    hostile_checkpoint(run / "best.pt", marker, through)
    argv = {"--resume --out-dir": run_args(data_dir, run, "--resume"),
            "--resume PATH": run_args(data_dir, tmp_path / "branch", "--resume", str(run / "last.pt")),
            "eval": ["eval", str(run / "last.pt"), "--device", "cpu"],
            "eval RUN_DIR": ["eval", str(run), "--device", "cpu"],
            "eval best.pt": ["eval", str(run / "best.pt"), "--device", "cpu"]}[how]
    message = one_error_line(capsys, cr.main(argv))
    assert "is refused: it holds Python objects other than tensors" in message and "weights_only" not in message
    assert not marker.exists() and not (tmp_path / "branch").exists()


def test_a_bare_pickle_given_as_a_checkpoint_is_one_line_from_the_command(tmp_path):
    # torch warns (two lines) about a pickle protocol it did not write; only the command's own line belongs
    path = tmp_path / "raw.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "cifar100_resnet"}, f, protocol=4)
    probe = (f"import cifar100_resnet as cr; print(cr.main(['eval', {str(path)!r}]), "
             f"cr.main(['--resume', {str(path)!r}, '--out-dir', {str(tmp_path / 'b')!r}]))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       cwd=Path(MODULE).parent)
    assert r.stdout.split() == ["2", "2"]
    assert r.stderr.splitlines() == [f"error: {path} is not a readable checkpoint (not a file written by "
                                     f"torch.save, or one cut short)"] * 2 and not (tmp_path / "b").exists()


def malformed_checkpoints(good: dict) -> dict:
    """Each malformed in one way, its checksum rewritten to fit (a stale one would be refused before the flaw)."""
    missing_model = {k: v for k, v in good.items() if k != "model"}
    bad_config = {**good, "config": {**good["config"], "epochs": "many"}}
    bad_rng = {**good, "rng": {"mix": good["rng"]["mix"]}}
    not_tensors = {**good, "model": {k: 1 for k in good["model"]}}
    wrong_shape = {**good, "model": {**good["model"], "fc.weight": torch.zeros(3, 3)}}
    cases = {"no model": missing_model, "config of wrong types": bad_config, "rng incomplete": bad_rng,
             "model not tensors": not_tensors, "weights not fitting their config": wrong_shape}
    cases = {name: {**c, "checksum": cr.tensor_checksum({k: v for k, v in c.items() if k != "checksum"})}
             for name, c in cases.items()}
    return {"keys missing": {"format": "cifar100_resnet", "epoch": 2}, **cases,
            "another format": {"format": "other", "epoch": 1}, "a list": [1, 2, 3]}


MALFORMED_SAYS = {  # what the one line says of each (both --resume and eval)
    "keys missing": "is not a complete cifar100_resnet checkpoint: config, best, model",
    "no model": "is not a complete cifar100_resnet checkpoint: model missing or malformed",
    "config of wrong types": "setting epochs must be int, got 'many'",
    "rng incomplete": "is not a complete cifar100_resnet checkpoint: 'rng' lacks its generator states",
    "model not tensors": "is not a complete cifar100_resnet checkpoint: the tensors of 'model' missing",
    "weights not fitting their config": "do not fit the model of its settings: fc.weight has shape (3, 3), the model "
                                        "built from it (100, 32)",
    "another format": "is not a cifar100_resnet checkpoint", "a list": "is not a cifar100_resnet checkpoint",
}


@pytest.mark.parametrize("case", [*MALFORMED_SAYS, "truncated", "empty", "random bytes"])
@pytest.mark.parametrize("how", ["--resume PATH", "eval"])
def test_a_malformed_checkpoint_is_one_line(data_dir, finished_run, tmp_path, capsys, case, how):
    if how == "eval" and case == "rng incomplete":
        pytest.skip("eval needs only the weights")
    path = tmp_path / "ckpt.pt"
    good = load(finished_run / "last.pt")
    if case == "truncated":
        path.write_bytes((finished_run / "last.pt").read_bytes()[:5000])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "random bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:
        torch.save(malformed_checkpoints(good)[case], path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = (run_args(data_dir, tmp_path / "branch", "--resume", str(path)) if how == "--resume PATH"
            else ["eval", str(path), "--device", "cpu", "--data-dir", str(data_dir)])
    message = one_error_line(capsys, cr.main(argv))
    assert str(path) in message or "setting epochs" in message
    if case in ("truncated", "empty", "random bytes"):  # in its own words, not torch's (an EOFError, say)
        assert message.endswith("is not a readable checkpoint (not a file written by torch.save, or one cut short)")
    else:
        assert MALFORMED_SAYS[case] in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def corrupt(folder: Path, case: str, marker: Path):
    train = folder / "train"
    batch = pickle.loads(train.read_bytes())
    if case == "truncated":
        train.write_bytes(train.read_bytes()[:len(train.read_bytes()) // 2])
    elif case == "empty":
        train.write_bytes(b"")
    elif case == "garbage text":
        train.write_text("garbage\n")
    elif case == "wrong shape":
        batch["data"] = batch["data"][:, :1000]
    elif case == "float pixels":
        batch["data"] = batch["data"].astype("float32")
    elif case == "labels out of range":
        batch["fine_labels"][0] = 100
    elif case == "label count":
        batch["fine_labels"] = batch["fine_labels"][:-1]
    elif case == "a class in two superclasses":  # a second image of the first one's class, in another superclass
        batch["fine_labels"][1] = batch["fine_labels"][0]
        batch["coarse_labels"][1] = (batch["coarse_labels"][0] + 1) % 20
    elif case == "wrong class count":
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a"] * 10}))
    elif case in ("hostile train", "hostile test", "hostile meta"):
        (folder / case.split()[1]).write_bytes(pickle.dumps(Payload(marker)))
    if case in ("wrong shape", "float pixels", "labels out of range", "label count", "a class in two superclasses"):
        train.write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("case", ["truncated", "empty", "garbage text", "wrong shape", "float pixels",
                                  "labels out of range", "label count", "a class in two superclasses",
                                  "wrong class count", "hostile train",
                                  "hostile test", "hostile meta"])
def test_corrupt_or_hostile_data_is_one_line_and_creates_nothing(tmp_path, capsys, case):
    data, marker = tmp_path / "data", tmp_path / "marker"
    folder = write_official_layout(data, n_train=100, n_test=50)
    corrupt(folder, case, marker)
    out = tmp_path / "run"
    message = one_error_line(capsys, cr.main(run_args(data, out)))
    assert str(folder) in message and "Error" not in message.split(": ", 1)[1][:40]
    assert not out.exists() and not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# Bad invocations: exit 2, exactly one line starting "error:", and nothing created or changed anywhere


def flip_a_tensor_byte(source: Path, target: Path) -> None:
    """A copy of a checkpoint with one byte changed in the middle of its largest tensor's data: a file that
    still loads, and holds a wrong weight."""
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x10
    target.write_bytes(bytes(raw))


@pytest.fixture(scope="session")
def sandbox(data_dir, reference, tmp_path_factory) -> Path:
    """The files the bad invocations name: run folders, checkpoints, sweeps and images, broken in one way each."""
    box = tmp_path_factory.mktemp("sandbox")
    (box / "done").symlink_to(reference, target_is_directory=True)
    (box / "a_file.txt").write_text("not a folder\n")
    (box / "stopped").mkdir()
    (box / "bad_extension").mkdir()  # extended from a number of epochs that is no whole number
    settings = json.loads((reference / "config.json").read_text())
    (box / "bad_extension" / "config.json").write_text(json.dumps({**settings, "extended_from": [2.5]}))
    (box / "stopped" / "config.json").write_text((reference / "config.json").read_text().replace(
        load(reference / "last.pt")["run_id"], "another-run"))
    with open(box / "raw.pt", "wb") as f:  # a bare pickle (protocol 4), not a file torch.save wrote
        pickle.dump({"format": "cifar100_resnet"}, f, protocol=4)
    flip_a_tensor_byte(reference / "ckpt_ep2.pt", box / "damaged.pt")
    metrics = (reference / "metrics.csv").read_text()
    config = json.loads((reference / "config.json").read_text())
    broken_runs = {"binary_metrics": (bytes(range(256)) * 4, config),
                   "nan_cell": (metrics.replace(metrics.splitlines()[2].split(",")[2], "abc", 1), config),
                   "renamed_header": (metrics.replace("train_loss", "training_loss", 1), config),
                   "bad_t0": (metrics, {**config, "t0_resolved": "x"})}
    for name, (rows, settings) in broken_runs.items():
        (box / name).mkdir()
        (box / name / "metrics.csv").write_bytes(rows if isinstance(rows, bytes) else rows.encode())
        (box / name / "config.json").write_text(json.dumps(settings))
        os.link(reference / "last.pt", box / name / "last.pt")
    sweep_record = json.dumps({"base": config, "varied": ["lr"], "grid": {"lr": [0.1]}})
    for name, table, summary in (("binary_sweep", bytes(range(256)) * 4, b"setting,chosen\n"),
                                 ("bad_summary", b"run,lr,final_val_top1\nlr=0.1,seed=0,0.1,0.5\n", b"setting\n")):
        (box / name).mkdir()
        (box / name / "sweep.json").write_text(sweep_record)
        (box / name / "sweep.csv").write_bytes(table)
        (box / name / "summary.csv").write_bytes(summary)
    (box / "grid_sweep").mkdir()
    (box / "grid_sweep" / "sweep.json").write_text(sweep_record)
    base = cr.TrainConfig.from_dict(config).saved()
    (box / "study").mkdir()
    (box / "study" / "sweep.json").write_text(json.dumps({"base": base, "search": "optuna", "varied": ["lr"]}))
    for name, content in (("garbage_study", b"garbage" * 100),
                          ("truncated_study", b"SQLite format 3\x00" + b"\x00" * 80)):
        (box / name).mkdir()
        (box / name / "optuna.db").write_bytes(content)
    run = box / "sweep_of_a_broken_run" / "runs" / "lr=0.1,seed=0"  # a sweep whose run's metrics.csv is binary
    run.mkdir(parents=True)
    planned = cr.config_from_args(cr.build_parser().parse_args([*RUN_FLAGS, "--data-dir", str(data_dir), "--lr",
                                                                "0.1", "--val-split", "100", "--out-dir", str(run)]))
    (run / "config.json").write_text(json.dumps(planned.saved()))
    (run / "metrics.csv").write_bytes(bytes(range(256)) * 4)
    (box / "lr_find_done").mkdir()
    for name in ("lr_find.csv", "lr_find.png"):
        (box / "lr_find_done" / name).write_text("written by an lr-find that finished\n")
    # a PNG of a hundred bytes that claims 20000 x 20000 pixels: Pillow refuses to decode it
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    (box / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2,
                                                                                      0, 0, 0))
                                   + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    return box


def tree(*roots: Path) -> dict:
    """Every file under the roots with a hash of its bytes, and every folder."""
    found = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            found[dirpath] = "folder"
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


BAD = [  # (argv, a text the error must contain); D = the data folder, R = the finished run, S = the sandbox
    (["--epochs", "0"], "--epochs must be at least 1"), (["--epochs", "-3"], "--epochs must be at least 1"),
    (["--epochs", "2.5"], "invalid int value: '2.5'"), (["--epochs", "many"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "0"], "--lr must be positive"),
    (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr must be a finite number below 3.4e38, got inf"),
    (["--lr", "1e39"], "--lr must be a finite number below 3.4e38, got 1e+39"),  # (SGD: an overflow traceback)
    (["--mixup-alpha", "inf"], "--mixup-alpha must be a finite number below 3.4e38, got inf"),
    (["--t0", "inf"], "--t0 must be a"), (["--weight-decay", "1e300"], "--weight-decay must be a finite number"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs a momentum: --momentum 0 has none"),
    (["--momentum", "1"], "--momentum"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--label-smoothing", "1"], "--label-smoothing"), (["--mixup-alpha", "-1"], "--mixup-alpha"),
    (["--cutmix-alpha", "-0.5"], "--cutmix-alpha"), (["--cutmix-prob", "1.5"], "--cutmix-prob"),
    (["--t0", "0"], "--t0"), (["--t0", "soon"], "--t0"), (["--t-mult", "0.5"], "--t-mult"),
    (["--warmup-epochs", "5", "--epochs", "4"], "--warmup-epochs"),
    (["--warmup-epochs", "4", "--epochs", "4"], "--warmup-epochs must be in [0, epochs), got 4.0 with 4 epochs"),
    (["--min-lr", "1"], "--min-lr"),
    (["--arch", "resnet50"], "invalid choice: 'resnet50'"), (["--stem", "tiny"], "invalid choice"),
    (["--width", "0"], "--width"), (["--dataset", "mnist"], "invalid choice"),
    (["--limit-train", "-1"], "--limit-train"), (["--limit-test", "-1"], "--limit-test"),
    (["--val-split", "-5"], "--val-split"), (["--val-split", "500"], "--val-split 500 leaves no training images"),
    (["--amp", "fp32"], "invalid choice"), (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
    (["--device", "tpu"], "--device"), (["--device", "cuda:7"], "--device cuda:7"),
    (["--compile", "maybe"], "invalid choice"), (["--cuda-graphs", "on"], "--cuda-graphs on needs"),
    (["--checkpoint-every", "-1"], "--checkpoint-every"), (["--log-every", "-1"], "--log-every"),
    (["--eval-batch-size", "0"], "--eval-batch-size"), (["--out-dir", ""], "--out-dir must be a folder name"),
    (["--epoch", "3"], "did you mean --epochs?"), (["--learning-rate", "0.1"], "unrecognized arguments"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["stray"], "unknown command 'stray'; the commands: train, eval,"),
    (["--epochs", "3", "stray"], "unrecognized arguments: stray"),
    (["--mix-off-epochs", "5"], "--mix-off-epochs 5 is longer than the run (4 epochs)"),
    (["--bn-recal", "-2"], "--bn-recal must be >= 0"), (["--ema", "1"], "--ema must be in (0, 1), or 0 for off"),
    (["--ema", "-0.5"], "--ema must be in (0, 1)"), (["eval", "{R}", "--ema"], "trained without --ema"),
    (["--mix-off-epochs", "-1"], "--mix-off-epochs must be >= 0"), (["--restart-warmup", "-1"], "must be >= 0"),
    (["--restart-warmup", "8"], "must be shorter than the cycles after a restart (the first of them: 8 epochs)"),
    (["--t0", "1e-300", "--t-mult", "1"], "--t0 1e-300 --t-mult 1 make 4e+300 cycles of the schedule, over 10,000"),
    (["--t0", "0.0001", "--t-mult", "1.0001"], "make 1.61e+04 cycles"),  # (each step walked them: a hang)
    (["trian"], "(did you mean train?)"), (["lr_find"], "(did you mean lr-find?)"),
    (["evaluate"], "(did you mean eval?)"),
    (["--out-dir", "{R}"], "holds another run"), (["--out-dir", "{S}/stopped"], "pass --resume to continue it"),
    (["--out-dir", "{S}/a_file.txt"], "is a file, not a folder"),
    (["--out-dir", "{S}/a_file.txt/sub"], "not a writable folder"),
    (["--batch-size", "251"], "--batch-size 251 is larger than the training set (250 images)"),
    (["--stem", "imagenet", "--limit-train", "226"], "BatchNorm cannot train with one image in a batch"),  # 9 x 25 + 1
    (["--stem", "imagenet", "--batch-size", "1"], "--stem imagenet shrinks 32x32 images to 1x1 maps"),
    (["--data-dir", "{D}/cifar-100-python"], "is the cifar-100-python folder itself: pass the folder that holds it"),
    (["--data-dir", "{S}/nowhere"], "cifar100 not found"),
    (["--data-dir", "{S}/a_file.txt"], "a_file.txt is a file, not a folder"),
    (["--resume"], "pass --out-dir"), (["--resume", "{S}/nowhere.pt"], "no checkpoint at"),
    (["--resume", "--out-dir", "{S}/nowhere"], "holds no run to resume"),
    (["--resume", "{S}/stopped", "--out-dir", "{S}/new"], "before its first checkpoint: nothing to branch from"),
    (["--resume", "{S}/bad_extension"], "holds settings this module cannot use: setting extended_from must be tuple "
                                        "or list, got [2.5]"),
    (["--resume", "{R}/ckpt_ep2.pt", "--out-dir", "{S}/stopped"], "holds another run"),
    (["--resume", "{R}/ckpt_ep2.pt", "--out-dir", "{R}"], "would overwrite them"),
    (["--resume", "--out-dir", "{R}", "--lr", "0.5"], "a resumed run keeps its settings"),
    (["--resume", "--out-dir", "{R}", "--arch", "resnet34"], "a resumed run keeps its settings"),
    (["--preset", "fast"], "invalid choice: 'fast'"),
    (["--preset", "plain30", "--epochs", "1"], "got 2.0 with 1 epochs (--preset plain30 sets --epochs 30 --batch"),
    (["--resume", "--out-dir", "{R}", "--preset", "plain30"], "a resumed run keeps its own (drop --preset)"),
    (["eval"], "required: checkpoint"), (["eval", "{S}/nowhere.pt"], "no checkpoint at"),
    (["eval", "{R}", "--batch-size", "0"], "--batch-size"), (["eval", "{R}", "--device", "tpu"], "--device"),
    (["eval", "{R}", "--limit-test", "-1"], "--limit-test"),
    (["eval", "{S}/a_file.txt"], "(not a file written by torch.save, or one cut short)"),
    (["eval", "{R}", "--tta", "yes"], "unrecognized arguments"), (["plot"], "required: run_dirs"),
    (["plot", "{S}/nowhere"], "no metrics.csv"), (["plot", "{R}", "--labels", "a", "b"], "--labels"),
    (["bench", "--epochs", "0"], "--epochs"), (["bench", "--bench-epochz", "1"], "did you mean --bench-epochs?"),
    (["bench", "--bench-epochs", "0"], "--bench-epochs must be at least 1"),
    (["--seed", "1180591620717411303424"], "--seed must be between -2^62 and 2^62"),
    # a checkpoint that is a bare pickle, or one with a changed byte (its checksum)
    (["--resume", "{S}/raw.pt", "--out-dir", "{S}/new"], "raw.pt is not a readable checkpoint"),
    (["eval", "{S}/raw.pt"], "raw.pt is not a readable checkpoint"),
    (["--resume", "{S}/damaged.pt", "--out-dir", "{S}/new"], "damaged.pt is damaged"),
    (["eval", "{S}/damaged.pt"], "damaged.pt is damaged"), (["report", "{S}/damaged.pt"], "damaged.pt is damaged"),
    (["conv-demo", "--checkpoint", "{S}/damaged.pt"], "damaged.pt is damaged"),
    # the lab's commands: lr-find
    (["lr-find", "--start", "0"], "0 < --start < --end"), (["lr-find", "--end", "1e-6"], "0 < --start < --end"),
    (["lr-find", "--end", "1e39"], "0 < --start < --end < 3.4e38, got --start 1e-05 --end 1e+39"),
    (["lr-find", "--steps", "1"], "--steps must be at least 2"), (["lr-find", "--stepz", "9"], "did you mean --steps?"),
    (["lr-find", "--resume"], "--resume is for training"),
    (["lr-find", "--out-dir", "{S}/a_file.txt"], "is a file, not a folder"),
    (["lr-find", "--out-dir", "{S}/lr_find_done"], "already holds a finished lr-find"),
    # sweep
    (["sweep"], "sweep needs --out-dir"), (["sweep", "--out-dir", "{S}/new"], "--grid NAME=V1,V2 ... or --random"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--random", "2", "lr=0:1"], "one of the two"),
    (["sweep", "--out-dir", "{S}/new", "--random", "lr=0:1"], "the number of settings first"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lrr=0.1"], "did you mean lr?"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--seeds", "a"], "--seeds must be integers"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--seeds", "0,1180591620717411303424"],
     "--seed must be between"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--val-split", "0"], "--val-split must be at least 1"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--val-split", "500"], "leaves no training images"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "batch_size=450", "--val-split", "100"], "larger than the training"),
    (["sweep", "--out-dir", "{S}/a_file.txt", "--grid", "lr=0.1"], "is a file, not a folder"),
    (["sweep", "--out-dir", "{S}/a_file.txt/sub", "--grid", "lr=0.1"], "not a writable folder"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--devices", "tpu"], "--device must be"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--storage", "sqlite://"], "for --search optuna"),
    (["sweep", "--out-dir", "{S}/study", "--grid", "lr=0.1"], "holds an Optuna study, not a grid or random sweep"),
    (["sweep", "--out-dir", "{S}/sweep_of_a_broken_run", "--grid", "lr=0.1"], "metrics.csv is not a readable CSV"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--grid", "lr=0.2"], "lr is given twice"),
    (["sweep", "--out-dir", "{S}/new", "--random", "2", "lr=0:1", "--random", "2", "width=4:8"], "--random is given"),
    (["sweep", "--out-dir", "{S}/new", "--random", "99999999999999999999", "lr=0:1"], "trains at most 10,000"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=1,2,3", "width=1,2,3", "--seeds", ",".join(map(str, range(1200)))],
     "would train 10,800 runs (9 settings x 1200 seeds)"),
    (["sweep", "--out-dir", "{S}/new", "--random", "2", "lr=log:0.1"], "a range is LOW:HIGH or log:LOW:HIGH"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "width=8.5"], "width takes whole numbers, got '8.5'"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr="], "'lr=' gives lr no values"),
    (["sweep", "--out-dir", "{S}/new", "--grid", "lr=0.1", "--devices", ""], "--device must be"),
    # a folder that no one can create, root included (to whom os.access says yes): one in Linux's /proc
    *([(["sweep", "--out-dir", "/proc/cifar100_nowhere", "--grid", "lr=0.1"], "cannot"),
       (["sweep", "--out-dir", "/proc/cifar100_nowhere", "--search", "optuna", "--random", "2", "lr=0.1:1"], "cannot"),
       (["report", "{R}", "--out-dir", "/proc/cifar100_nowhere"], "cannot")] if os.path.isdir("/proc/self") else []),
    # an Optuna study: its storage, its base settings, its data
    (["sweep", "--out-dir", "{S}/new", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5", "--storage",
      "notaurl"], "cannot open the study's database notaurl"),
    (["sweep", "--out-dir", "{S}/new", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5", "--storage",
      "sqlite:////missing/x.db"], "cannot open the study's database sqlite:////missing/x.db"),
    (["sweep", "--out-dir", "{S}/new", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5", "--storage",
      "postgresql://user:pw@127.0.0.1:9/db"], "postgresql://user:pw@127.0.0.1:9/db"),
    (["sweep", "--out-dir", "{S}/garbage_study", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5"],
     "cannot open the study's database"),
    (["sweep", "--out-dir", "{S}/truncated_study", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5"],
     "cannot open the study's database"),
    (["sweep", "--out-dir", "{S}/study", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5", "--epochs", "2"],
     "holds a study with other settings: --epochs 2 (the run has 4)"),
    (["sweep", "--out-dir", "{S}/grid_sweep", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5"],
     "holds a grid or random sweep, not an Optuna study"),
    (["sweep", "--out-dir", "{S}/new", "--search", "optuna", "--random", "2", "lr=log:0.01:0.5", "--val-split",
      "500"], "leaves no training images"),
    # plot and report: their outputs, and broken files of runs and sweeps
    (["plot", "--schedule", "--out", "{S}/schedule.txt"], "ends in .png"),
    (["plot", "--schedule", "--out", "{S}/a_file.txt/x.png"], "not a writable folder"),
    (["plot", "--schedule", "--out", "{S}"], "is a folder"), (["plot", "{R}", "--out", "{S}/x.txt"], "ends in .png"),
    (["plot", "{R}", "--out", "{S}/done"], "is a folder"),
    (["plot", "{S}/binary_metrics"], "binary_metrics/metrics.csv is not a readable CSV file"),
    (["plot", "{S}/nan_cell"], "train_loss is 'abc', not a number"),
    (["plot", "{S}/renamed_header"], "lacks the column train_loss"),
    (["plot", "{S}/bad_t0"], "bad_t0/config.json does not hold a run's settings: t0_resolved must be"),
    (["plot", "{S}/binary_sweep"], "binary_sweep/sweep.csv is not a readable CSV file"),
    (["plot", "{S}/bad_summary"], "bad_summary/summary.csv lacks the column chosen"),
    (["report", "{S}/binary_metrics"], "binary_metrics/metrics.csv is not a readable CSV file"),
    (["report", "{S}/nan_cell"], "not a number"), (["report", "{S}/bad_t0"], "t0_resolved must be"),
    (["report", "{S}/nowhere.pt"], "no checkpoint at"), (["report", "{R}", "--out-dir", "{S}/a_file.txt"], "a file"),
    # preview-aug, conv-demo
    (["preview-aug", "--images", "0"], "--images must be in 1..16"),
    (["preview-aug", "--out", "{S}/x.txt"], "ends in .png"), (["preview-aug", "--out", "{S}"], "is a folder"),
    (["conv-demo", "--kernel", "1,2,3"], "square number"), (["conv-demo", "--kernel", "a"], "numbers separated"),
    (["conv-demo", "--index", "999"], "--index must be in 0..99"),
    (["conv-demo", "--image", "{S}/nowhere.png"], "cannot read the image"),
    (["conv-demo", "--image", "{S}/bomb.png"], "cannot read the image"),
    (["conv-demo", "--out", "{S}/x.txt"], "ends in .png"), (["conv-demo", "--filtr", "edge"], "did you mean"),
    (["conv-demo", "--kernel=inf,0,0,0,0,0,0,0,0"], "--kernel must be finite numbers separated by commas"),
    (["bench", "--batch-size", "251"], "--batch-size 251 is larger than the training set (250 images)"),
]
TRAIN_FLAG_COMMANDS = ("lr-find", "sweep", "preview-aug", "bench")  # they take every train flag


def test_the_table_of_bad_invocations_has_at_least_40_rows():
    assert len(BAD) >= 40


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_a_bad_invocation_is_one_line_exit_2_and_changes_no_file(sandbox, data_dir, reference, capsys,
                                                                  monkeypatch, argv, expected):
    monkeypatch.chdir(sandbox)  # the default --out-dir (runs/...) would land here
    places = {"{S}": str(sandbox), "{R}": str(reference), "{D}": str(data_dir)}
    for key, place in places.items():
        argv = [a.replace(key, place) for a in argv]
    if argv[0] in TRAIN_FLAG_COMMANDS:  # a sweep holds out 100 of the 250 images unless the row says otherwise
        argv = [argv[0], *RUN_FLAGS, "--data-dir", str(data_dir), *["--val-split", "100"] * (argv[0] == "sweep"),
                *argv[1:]]
    elif argv[0] in ("eval", "report", "conv-demo"):
        argv = [*argv, "--data-dir", str(data_dir)] if len(argv) > 1 else argv
    elif argv[0].startswith("-"):  # a bare word first is a (misspelt) command
        argv = [*RUN_FLAGS, "--data-dir", str(data_dir), *argv]
    before = tree(sandbox, reference, data_dir)
    message = one_error_line(capsys, cr.main(argv))
    assert expected in message and ("see " in message or not message.startswith("error: argument"))
    assert tree(sandbox, reference, data_dir) == before


def test_a_checkpoint_of_one_run_never_continues_in_another_runs_folder(data_dir, reference, tmp_path, capsys):
    # the campaign's case: A (the reference, 4 epochs) and B (seed 5, 2 epochs), then A's ckpt_ep2.pt into B
    other = tmp_path / "b"
    assert cr.main(run_args(data_dir, other, "--quiet", "--seed", "5", "--epochs", "2")) == 0
    before = tree(other)
    message = one_error_line(capsys, cr.main(run_args(data_dir, other, "--quiet", "--resume",
                                                      str(reference / "ckpt_ep2.pt"))))
    assert f"--out-dir {other} holds another run" in message and tree(other) == before
    # into an empty folder it branches off as a new run that records where it came from
    branch = tmp_path / "branch"
    assert cr.main(run_args(data_dir, branch, "--quiet", "--resume", str(reference / "ckpt_ep2.pt"))) == 0
    config = json.loads((branch / "config.json").read_text())
    assert config["branched_from"]["run_id"] == load(reference / "last.pt")["run_id"] != config["run_id"]
    assert config["branched_from"]["epoch"] == 2 and load(branch / "last.pt")["run_id"] == config["run_id"]
    assert_equal_values(deterministic_state(load(branch / "last.pt")),
                        deterministic_state(load(reference / "last.pt")), "branch")
