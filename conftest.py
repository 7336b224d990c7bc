"""What the test files share: a small CIFAR in the official "python version" layout with a learnable signal,
the tiny run most tests start from, and helpers to run and compare runs. (This file also makes the repository
root importable for the tests in bench/: pytest puts its folder on sys.path.)

Only torch, numpy and pytest are needed here: test_cifar100_resnet.py runs with nothing else installed."""

import contextlib
import csv
import gc
import json
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import cifar100_resnet as cr

# Every process the tests start computes with one thread: two cores are shared by the test process and its
# children (several at once under torchrun, a sweep's workers, two pytest workers), and a child that starts
# torch's default threads fights the others for them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)  # and the tests' own process, so that a run here and one in a child agree to the bit

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent / "shared"
# ...and loads fault_points/sitecustomize.py at start-up: with FAULT_PAUSE_ENV (its ENV: the same name, kept
# there too, since importing that file patches the process) set to the start of a label ("written best.pt"),
# it pauses the process at that step of a file's write and says so on stderr
FAULT_PAUSE_ENV = "CIFAR100_FAULT_PAUSE"
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "fault_points"), os.environ.get("PYTHONPATH")]))
MODULE = str(HERE / "cifar100_resnet.py")
LAB = str(HERE / "cifar100_lab.py")
DETERMINISTIC_COLUMNS = ["epoch", "lr", "train_loss", "test_loss", "test_top1", "test_top5"]  # all but times


def make_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072) rows: noise plus a class-specific colour and a class-specific bright square."""
    n = len(labels)
    images = rng.integers(0, 96, (n, 3, 32, 32)).astype(np.int64)
    palette = np.random.default_rng(1234).integers(0, 160, (num_classes, 3))
    images += palette[labels][:, :, None, None]
    for i, y in enumerate(labels):
        r, c = (y * 7) % 24, (y * 13) % 24
        images[i, :, r:r + 8, c:c + 8] = 255
    return images.clip(0, 255).astype(np.uint8).reshape(n, 3072)


def write_official_layout(root: Path, n_train: int = 200, n_test: int = 100, dataset: str = "cifar100",
                          seed: int = 0, protocol: int = 2) -> Path:
    """Write root/<official folder>/ the way the official release is laid out; returns that folder."""
    info = cr.DATASETS[dataset]
    folder = root / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = {"train": np.array_split(np.arange(n_train), len(info.train_files)),
                "test": [np.arange(n_test)]}
    for split, files in (("train", info.train_files), ("test", info.test_files)):
        n = n_train if split == "train" else n_test
        labels = np.arange(n) % info.num_classes
        rng.shuffle(labels)
        images = make_images(labels, info.num_classes, rng)
        for name, idx in zip(files, per_file[split]):
            batch = {"data": images[idx], info.label_key: labels[idx].astype(int).tolist(),
                     "filenames": [f"{split}_{i}.png" for i in idx], "batch_label": split}
            if dataset == "cifar100":
                batch["coarse_labels"] = (labels[idx] // 5).astype(int).tolist()
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=protocol)
    meta = {info.names_key: [f"class_{i}" for i in range(info.num_classes)]}
    if dataset == "cifar100":
        meta["coarse_label_names"] = [f"super_{i}" for i in range(20)]
    with open(folder / info.meta_file, "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return folder


def synthetic_data(n_train=512, n_test=256, dataset="cifar10", seed=0) -> "cr.CifarData":
    """The same kind of images as write_official_layout's, as a CifarData in memory."""
    info = cr.DATASETS[dataset]
    rng = np.random.default_rng(seed)
    out = []
    for n in (n_train, n_test):
        labels = rng.integers(0, info.num_classes, n)
        images = make_images(labels, info.num_classes, rng).reshape(n, 3, 32, 32)
        out += [torch.from_numpy(images), torch.from_numpy(labels)]
    return cr.CifarData(*out, [str(i) for i in range(info.num_classes)], info)


def tiny_args(data_dir, out_dir, *extra):
    """CLI flags for a run of seconds: resnet18 of width 4, batches of 32, 2 epochs."""
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--arch", "resnet18", "--width", "4",
            "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--quiet", "--no-download", *extra]


# ----------------------------------------------------------------------------------------------------------
# The command line in processes of its own, forked from one that has imported torch, the library and the lab
# once (a fresh interpreter spends 3-5 s of a core importing torch and torch._dynamo). Each command runs as
# `python FILE args` would, from main(): its own process, environment, folder, signals and exit code, its
# output in files. Tests of a fresh interpreter (imports, python -m, the console command) start one.

COMMAND_SERVER = r"""
import json, os, select, sys
sys.path[0] = os.getcwd()
import cifar100_lab, cifar100_resnet, torch._dynamo
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot, optuna
except ImportError:
    pass
children, pending = {}, b""
while True:
    ready = select.select([0], [], [], 0.02)[0]
    while children:  # every child that has ended
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        print(json.dumps({"tag": children.pop(pid), "code": os.waitstatus_to_exitcode(status)}), flush=True)
    if not ready:
        continue
    data = os.read(0, 65536)
    if not data:
        break
    pending += data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                os.environ.update(request["env"])
                os.chdir(request["cwd"])
                sys.argv = [request["program"], *request["args"]]
                lab = os.path.basename(request["program"]) == "cifar100_lab.py"
                code = (cifar100_lab.main if lab else cifar100_resnet.main)(request["args"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                import atexit
                atexit._run_exitfuncs()  # as at a normal exit (multiprocessing releases its semaphores there)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = request["tag"]
        print(json.dumps({"tag": request["tag"], "pid": pid}), flush=True)
"""


class _Output:
    """A forked command's stdout or stderr, read as Popen's pipes are here: a line at a time, or the rest."""

    def __init__(self, path: Path, process: "Forked"):
        self.path, self.process, self.offset = path, process, 0

    def readline(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.path.read_text() if self.path.exists() else ""
            end = text.find("\n", self.offset)
            if end >= 0 or self.process.poll() is not None or time.monotonic() > deadline:
                line = text[self.offset:end + 1] if end >= 0 else text[self.offset:]
                self.offset += len(line)
                return line
            time.sleep(0.01)

    def read(self) -> str:
        text = self.path.read_text() if self.path.exists() else ""
        rest, self.offset = text[self.offset:], len(text)
        return rest


class Forked:
    """A command forked by the command server, used as a subprocess.Popen."""

    def __init__(self, pid: int, replies: queue.Queue, out: Path, err: Path):
        self.pid, self.replies, self.returncode = pid, replies, None
        self.stdout, self.stderr = _Output(out, self), _Output(err, self)

    def poll(self):
        if self.returncode is None and not self.replies.empty():
            self.returncode = self.replies.get()["code"]
        return self.returncode

    def wait(self, timeout: float = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.replies.get(timeout=timeout)["code"]
            except queue.Empty:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout) from None
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float = None) -> tuple:
        self.wait(timeout)
        return self.stdout.read(), self.stderr.read()


class _CommandServer:
    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="cifar100_commands_"))
        self.count, self.replies, self.lock = 0, {}, threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-c", COMMAND_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=HERE)
        threading.Thread(target=self._read, daemon=True).start()

    def _queue(self, tag: int) -> queue.Queue:
        with self.lock:
            return self.replies.setdefault(tag, queue.Queue())

    def _read(self):
        for line in self.proc.stdout:
            reply = json.loads(line)
            self._queue(reply["tag"]).put(reply)

    def start(self, args, program: str, env: Optional[dict], cwd) -> Forked:
        with self.lock:
            self.count += 1
            tag = self.count
            out, err = self.folder / f"{tag}.out", self.folder / f"{tag}.err"
            self.proc.stdin.write(json.dumps({"tag": tag, "args": [str(a) for a in args], "program": str(program),
                                              "env": env or {}, "cwd": str(cwd), "stdout": str(out),
                                              "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
        replies = self._queue(tag)
        return Forked(replies.get(timeout=120)["pid"], replies, out, err)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


_server: list = []


def start_cli(*args, program: str = MODULE, env: Optional[dict] = None, cwd=HERE) -> Forked:
    """`python program args` (cifar100_resnet.py or cifar100_lab.py) in a process of its own, running."""
    if not _server:
        _server.append(_CommandServer())
    return _server[0].start(args, program, env, cwd)


def run_cli(*args, timeout: float = 300, program: str = MODULE, env: Optional[dict] = None, cwd=HERE):
    """`python program args`, run to its end: .returncode, .stdout and .stderr, as subprocess.run's."""
    process = start_cli(*args, program=program, env=env, cwd=cwd)
    stdout, stderr = process.communicate(timeout)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def pytest_collection_modifyitems(items):
    """The library's tests are marked `library` (those of them that need an extra, `extra`, by hand): CI runs them
    where only torch, numpy and pytest are installed, and then the others with `-m "not library or extra"`. The
    tests marked `slow` go first, so that on several cores (pytest -n 2) the others run beside them."""
    for item in items:
        if item.path.name == "test_cifar100_resnet.py":
            item.add_marker(pytest.mark.library)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: the rest in order


@pytest.fixture(scope="session", autouse=True)
def _close_the_command_server():
    yield
    if _server:
        _server.pop().close()


def model_tensors(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metric_rows(run_dir) -> list:
    return read_csv(Path(run_dir) / "metrics.csv")


@contextlib.contextmanager
def trainers_alive_after(monkeypatch):
    """Runs its block with the garbage collector off, and fills the list it yields with whether each Trainer
    made inside is still alive after it (read before gc.enable(), whose first collection would free them all).
    torch imports torch._dynamo lazily, inside the optimiser's first construction, and what that import keeps
    holds the frames it ran in: imported here first, so the block's first trainer is not held by it."""
    trainers, alive, init = [], [], cr.Trainer.__init__
    monkeypatch.setattr(cr.Trainer, "__init__", lambda self, *a, **k: trainers.append(weakref.ref(self)) or init(
        self, *a, **k))
    import torch._dynamo  # noqa: F401
    gc.disable()
    try:
        yield alive
        alive.extend(trainer() is not None for trainer in trainers)
    finally:
        gc.enable()


def stop_on_call(n: int):
    """A should_stop that says stop on its n-th call. train() asks after every step but an epoch's last,
    and once after each epoch."""
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) == n

    return should_stop


def official_layout(tmp_path_factory, n_train: int, n_test: int) -> Path:
    """A fresh folder holding a synthetic CIFAR-100 in the official layout."""
    root = tmp_path_factory.mktemp("data")
    write_official_layout(root, n_train=n_train, n_test=n_test)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return official_layout(tmp_path_factory, 192, 64)


@pytest.fixture(scope="session")
def tiny_run(tiny_data_dir, tmp_path_factory) -> Path:
    """The default tiny run (tiny_args: 2 epochs), trained once for the tests that only read it or compare
    with it."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    assert cr.main(tiny_args(tiny_data_dir, out)) == 0
    return out


@pytest.fixture(scope="session")
def real_cifar100_subset(tmp_path_factory) -> Path:
    """The first 5,000 training and 1,000 test images of the real CIFAR-100, written in the official layout
    by the shared tool (read exactly as a user's download is); skipped where ../shared is absent."""
    tool = SHARED / "tools" / "cifar100_to_official_layout.py"
    if not tool.exists():
        pytest.skip("the real CIFAR-100 (../shared) is not beside this clone")
    pytest.importorskip("PIL", reason="the tool that writes the real CIFAR-100 decodes it with Pillow")
    root = tmp_path_factory.mktemp("real_cifar100")
    r = subprocess.run([sys.executable, str(tool), str(root), "--limit-train", "5000", "--limit-test", "1000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return root
