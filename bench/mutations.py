"""Mutation check of the library: each entry changes one line of cifar100_resnet.py the way a plausible bug
would, runs the test suites, and says whether a test failed (CAUGHT) or all passed (MISSED). The file is
restored after each, and on any exit. A MISSED mutation is an untested behaviour, or an equivalent change.

    python bench/mutations.py                 # all of them: about an hour on 2 cores (a caught one stops at
    python bench/mutations.py vote share      # its first failure, -x; a missed one runs everything)

On 2026-12-04 (2-core Intel Xeon) the first runs missed 19 of these 66 (and only a test written earlier that day
caught the folder lock's); the tests added that day catch every one.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "cifar100_resnet.py"
SUITES = "test_cifar100_resnet.py test_augmentation.py test_faults.py test_distributed.py test_cifar100_lab.py"

MUTATIONS = [  # (name, a line of the library (stripped; it must occur once), what it becomes)
    ('barrier', 'torch.distributed.barrier(group=self.control)',
     'pass'),
    ('ddp drop', 'self.ddp = self.forward_loss = None',
     'self.forward_loss = None'),
    ('moved rng', 'partial.data_rng_at_start = self.data_rng.get_state()',
     'pass'),
    ('layout', 'state["momentum_buffer"] = torch.empty_like(param).copy_(buffer)',
     'pass'),
    ('checksum', 'if checksum is not None and checksum != tensor_checksum(ckpt):',
     'if False:'),
    ('later epochs', 'if _position(later) > _position(point.ckpt):',
     'if False:'),
    ('ema decay', 'decay = min(self.config.ema, 1 - self.ema_updates ** (-2 / 3))',
     'decay = self.config.ema'),
    ('hair', 'hair = 1e-6 if epoch >= config.epochs - 1e-9 else 0.0',
     'hair = 0.0'),
    ('best >', 'if row[trainer.best["metric"]] > trainer.best["value"]:',
     'if row[trainer.best["metric"]] >= trainer.best["value"]:'),
    ('first bad', 'state.first_bad_step = torch.where(bad_now, step, state.first_bad_step)',
     'state.first_bad_step = torch.where(bad_now, 0, state.first_bad_step)'),
    ('crop range', 'torch.randint(0, 2 * padding + 1, (n, 1, 1, 1)',
     'torch.randint(0, 2 * padding, (n, 1, 1, 1)'),
    ('mix loss', 'nll = nll_b + lam * (nll - nll_b)',
     'nll = nll + lam * (nll_b - nll)'),
    ('cutmix prob', 'use_cutmix = float(torch.rand((), generator=generator)) < config.cutmix_prob',
     'use_cutmix = float(torch.rand((), generator=generator)) > config.cutmix_prob'),
    ('warmup', 'return config.lr * epoch / config.warmup_epochs',
     'return config.lr * (epoch + 0.5) / (config.warmup_epochs + 0.5)'),
    ('wd groups', '"params": [p for p in params if p.ndim >= 2]',
     '"params": [p for p in params if p.ndim > 2]'),
    ('top5', 'hits.any(dim=1).sum()',
     'hits[:, :4].any(dim=1).sum()'),
    ('resumed secs', 'started = time.perf_counter() - state.seconds',
     'started = time.perf_counter()'),
    ('vote', 'stop, self._vote = stop or bool(mine.item()), None',
     'stop, self._vote = stop, None'),
    ('share', 'first = self.rank * size + min(self.rank, extra)',
     'first = self.rank * size'),
    ('ema lerp', 'torch._foreach_lerp_(*self._ema_floats, 1.0 - decay)',
     'torch._foreach_lerp_(*self._ema_floats, decay)'),
    ('temp removal', 'if name.startswith(".") and name.endswith(TEMP_SUFFIX):',
     'if False:'),
    ('ckpt every', 'if every and state["epoch"] % every == 0:',
     'if every and state["epoch"] % every == 1:'),
    ('t0 auto', 'while epochs / sum(t_mult ** i for i in range(k + 1)) >= notebook_t0:',
     'while epochs / sum(t_mult ** i for i in range(k + 1)) > notebook_t0:'),
    ('warmup check', 'if not 0 <= self.warmup_epochs < self.epochs:',
     'if not 0 <= self.warmup_epochs <= self.epochs:'),
    ('tta', 'logits["tta_"] = (logits[""] + torch.cat(mirrored)) / 2',
     'logits["tta_"] = torch.cat(mirrored)'),
    ('bn momentum', 'module.momentum = None',
     'module.momentum = 0.1'),
    ('mix off',
     'mixing = self.config if self.epoch < self.config.epochs - self.config.mix_off_epochs else self.unmixed',
     'mixing = self.config if self.epoch <= self.config.epochs - self.config.mix_off_epochs else self.unmixed'),
    ('policy index', 'chosen[:, g] = torch.where(applies, member + 3 * g, -1)',
     'chosen[:, g] = torch.where(applies, member, -1)'),
    ('repair csv', 'if f.read() == content:',
     'if True:'),
    ('shape check', 'if ours[name].shape != theirs[name].shape:',
     'if False:'),
    ('load best', 'self.epoch, self.best = int(ckpt["epoch"]), dict(ckpt["best"])',
     'self.epoch = int(ckpt["epoch"])'),
    ('second sig', 'raise KeyboardInterrupt(f"aborted by a second {name}; {self.kept}", 128 + signum)',
     'return'),
    ('cut box', 'return max(top, 0), min(top + cut_h, height), max(left, 0), min(left + cut_w, width)',
     'return max(top, 0), min(top + cut_h, height), max(left, 0), min(left + cut_h, width)'),
    ('normalize', 'self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t / std_t',
     'self.scale, self.shift = 1.0 / (255.0 * std_t), -mean_t'),
    ('val split', '"val": (data.train_images[n_fit:n_train], data.train_labels[n_fit:n_train]),',
     '"val": (data.train_images[:n_train - n_fit], data.train_labels[:n_train - n_fit]),'),
    ('int list', 'ok = all(type(v) is int for v in value)',
     'ok = True'),
    ('bad min', 'bad = torch.where(bad < 0, self.steps_per_epoch, bad)',
     'bad = bad'),
    ('stop poll', 'if state.step < self.steps_per_epoch and self.agree_to_stop(should_stop()):',
     'if state.step < self.steps_per_epoch - 1 and self.agree_to_stop(should_stop()):'),
    ('ddp weight', 'weight = n * self.world / len(images)',
     'weight = 1.0'),
    ('label range', 'if fine and not 0 <= min(fine) <= max(fine) < info.num_classes:',
     'if fine and not 0 <= min(fine) <= max(fine) <= info.num_classes:'),
    ('two supers', 'if len(superclass_of) != len(pairs | test_pairs):',
     'if False:'),
    ('dl cleanup', 'if created:  # leave no empty or half-filled folder behind',
     'if False:'),
    ('folder itself', 'if missing and all(os.path.isfile(os.path.join(data_dir, f)) for f in expected):',
     'if False:'),
    ('batch>train', 'if global_batch > self.n_train:',
     'if False:'),
    ('seed data', 'self.data_rng = torch.Generator(self.device).manual_seed(config.seed + 1)',
     'self.data_rng = torch.Generator(self.device).manual_seed(config.seed + 2)'),
    ('sched warn', 'if trainer.epoch == 0 and (warning := schedule_end_warning(config, trainer.t0)):',
     'if (warning := schedule_end_warning(config, trainer.t0)):'),
    ('ext config', 'elif saved.get("epochs") != config.epochs:',
     'elif False:'),
    ('repair log', 'if repaired and not branched:',
     'if False:'),
    ('complete', 'if trainer.epoch >= config.epochs:',
     'if False:'),
    ('test nan', 'if not all(math.isfinite(row[f"{split}_loss"]) for split',
     'if not all(True or math.isfinite(row[f"{split}_loss"]) for split'),
    ('other run', 'elif (folder.saved_config() or {}).get("run_id") != point.identity:',
     'elif False:'),
    ('branch stop', 'if out_dir and os.path.realpath(out_dir) != os.path.realpath(source):',
     'if False:'),
    ('run id', 'trainer.run_id = point.identity if point and point.identity and not branched else',
     'trainer.run_id = None if True else'),
    ('lock', 'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)',
     'pass'),
    ('at once', 'if self.at_once:',
     'if False:'),
    ('sigterm dfl', 'signal.signal(signal.SIGTERM, signal.SIG_DFL)',
     'pass'),
    ('tty', 'if not self.tty:',
     'if False:'),
    ('stamp', 'while os.path.exists(config.out_dir):',
     'while False:'),
    ('eval note', 'if r["chosen_on_test"]:',
     'if False:'),
    ('fp16 cpu', 'if config.amp == "fp16" and resolve_device(device).type != "cuda":',
     'if False:'),
    ('no-flag', 'if m["resumable"] and not (f.default or m["display"]):',
     'if False:'),
    ('torchrun cmd', 'if command != "train" and _under_torchrun():',
     'if False:'),
    ('cost note', 'if abs(estimate - note) > 0.25 * note:',
     'if abs(estimate - note) > 2.5 * note:'),
    ('imagenet bs', 'if config.stem == "imagenet" and min(config.batch_size, last // self.world) < 2:',
     'if False:'),
    ('repair ckpt', 'elif torch.load(path, map_location="cpu", weights_only=True).get("epoch") == state["epoch"]:',
     'elif True:'),
    ('best file', 'if state["best"]["epoch"] == state["epoch"]:',
     'if True:'),
]


def mutated(source: str, line: str, replacement: str) -> str:
    """source with the one line whose stripped text is `line` replaced, its indentation kept."""
    lines = source.splitlines(keepends=True)
    found = [i for i, text in enumerate(lines) if line in text]
    if len(found) != 1:
        raise SystemExit(f"error: {line!r} occurs {len(found)} times in {LIBRARY.name}, not once: update the list")
    text = lines[found[0]]
    lines[found[0]] = text.replace(line, replacement)
    return "".join(lines)


def main(names: list) -> int:
    unknown = set(names) - {name for name, _, _ in MUTATIONS}
    if unknown:
        print(f"error: no mutation named {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    original = LIBRARY.read_text()
    missed = 0
    try:
        for name, line, replacement in MUTATIONS:
            if names and name not in names:
                continue
            LIBRARY.write_text(mutated(original, line, replacement))
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "2", "-p", "no:cacheprovider",
                                  *os.environ.get("MUTATION_TESTS", SUITES).split()], cwd=ROOT, capture_output=True,
                                 text=True)
            last = (run.stdout.strip().splitlines() or [""])[-1]
            verdict = {0: "MISSED", 1: "CAUGHT", 2: "CAUGHT"}.get(run.returncode, f"rc={run.returncode}")  # 2: -x
            missed += verdict == "MISSED"
            print(f"{name:16s} {verdict}  {last}", flush=True)
    finally:
        LIBRARY.write_text(original)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
