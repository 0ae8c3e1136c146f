"""The training loop: config -> data -> model -> DeepSpeed engine -> steps, with logging,
evaluation, checkpoint cadence, resume and signal handling.

Run with a launcher (`deepspeed ... train.py`, `torchrun ... train.py`); started bare
(`python train.py`) it launches itself on the local GPUs, or on 2 CPU ranks (gloo).
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from furnace import engine as eng
from furnace import faults
from furnace.config import ConfigError, gradient_accumulation_steps, load_config, validate

log = logging.getLogger("furnace")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="train.py", description="Train a Flamingo-style model with DeepSpeed.")
    p.add_argument("--config", "--preset", default="demo", help="preset name (demo, flamingo-1b, ...) or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("--nproc", type=int, default=0,
                   help="ranks to launch when started without a launcher (default: GPUs present, else 2)")
    return p.parse_args(argv)


def launched() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world_size(args) -> int:
    if args.nproc:
        return args.nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _without_nproc(argv):
    """Drop --nproc for the children (torchrun's parser would take it as its own --nproc-per-node)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(argv, nproc: int) -> int:
    """Start `nproc` local ranks of this same command with torch's launcher (no ssh needed)."""
    target = [os.path.abspath(sys.argv[0])] if os.path.isfile(sys.argv[0]) else ["-m", "furnace.train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *argv]
    print(f"furnace: no launcher found; starting {nproc} local ranks: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        world = int(os.environ["WORLD_SIZE"]) if launched() else local_world_size(args)
        dp = validate(cfg, world)
    except (ConfigError, FileNotFoundError) as e:
        print(f"furnace: config error: {e}", file=sys.stderr)
        return 2
    if not launched():
        return relaunch(_without_nproc(argv), world)
    return Trainer(cfg, dp).run()


class Trainer:
    def __init__(self, cfg, dp: int):
        self.cfg = cfg
        self.dp = dp
        self.stop_requested = False
        self.replica = None  # plain copy of the model for evaluation (built on first use)

    # -------------------------------------------------------------- setup

    def _setup_logging(self, rank: int) -> None:
        run_dir = Path(self.cfg.train.run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(message)s")
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank:03d}.log")
        fh.setFormatter(fmt)
        log.handlers[:] = [fh]
        if rank == 0:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(logging.Formatter("%(message)s"))
            sh.setLevel(logging.WARNING)
            log.addHandler(sh)
        log.setLevel(logging.INFO)
        log.propagate = False

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True
        log.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")

    def setup(self) -> None:
        import warnings

        from deepspeed.utils import logger as ds_logger

        # DeepSpeed's per-call deprecation warnings would bury the progress bar.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        ds_logger.setLevel(logging.WARNING)

        cfg = self.cfg
        from furnace.data.synthetic import ensure_demo_data
        from furnace.data.tokenizer import load_tokenizer

        from furnace.engine import init_distributed

        init_distributed(timeout=datetime.timedelta(minutes=30))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._setup_logging(self.rank)
        log.info("pid %d, world %d, host %s", os.getpid(), self.world, os.uname().nodename)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        log.info("config: %s", cfg.to_dict())

        import furnace_kernels
        from furnace.parallel.topology import Topology

        furnace_kernels.set_attention_backend(cfg.model.attention_backend)
        self.topo = Topology(cfg.parallel.tp, cfg.parallel.pp)
        self.grad_accum = gradient_accumulation_steps(cfg, self.dp)

        paths = ensure_demo_data(cfg.data, progress=self.rank == 0)
        self.tokenizer = load_tokenizer(paths["tokenizer"])
        if self.rank == 0:  # the run carries its tokenizer: exports and evals need no other path
            self.tokenizer.save_pretrained(Path(cfg.train.run_dir) / "tokenizer")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        from furnace.model.flamingo import build_from_tokenizer

        model = build_from_tokenizer(cfg.model, self.tokenizer)
        self.flops = self._flop_model(model)  # of the whole model, before sharding
        if cfg.parallel.tp > 1:
            from furnace.parallel.apply import parallelize

            parallelize(model, self.topo)  # this rank's shards of the full, seeded weights
        self.model = model
        self.pipe = None
        if cfg.parallel.pp > 1:
            from furnace.parallel.pipeline import flamingo_pipeline

            self.pipe = flamingo_pipeline(
                model, self.topo, activation_checkpoint_interval=cfg.parallel.pipeline_activation_checkpoint_interval)
        self.engine, self.ds_config = eng.initialize(cfg, self.pipe if self.pipe is not None else model, self.topo,
                                                     self.dp, self.grad_accum)
        self.device = self.engine.device
        self.vision_stats = model.vision.image_stats
        self.image_size = model.vision.image_size

        from furnace.data.loader import make_loader

        mean, std = self.vision_stats
        replicated = os.environ.get("FURNACE_REPLICATED_DATA") == "1"
        self.loader = make_loader(cfg.data, self.tokenizer, split="train", batch_size=cfg.train.micro_batch_size,
                                  dp_rank=0 if replicated else self.topo.coord.dp, dp_size=1 if replicated else self.dp,
                                  seed=cfg.train.seed, image_size=self.image_size, mean=mean, std=std)
        if replicated:
            # Layout-independent data (parity tests): every rank reads the 1-rank stream of
            # micro-batches and keeps those with index % dp == its dp rank, so each optimizer
            # step sees the same micro-batches (same grouping of samples) as a 1-rank run.
            self.loader = DPSlice(self.loader, self.topo.coord.dp, self.dp)
        self.log_gate_grads = os.environ.get("FURNACE_LOG_GATE_GRADS") == "1"
        self.gate_grads: dict[str, float] = {}
        if self.log_gate_grads and self.pipe is not None:
            self._install_gate_hooks()
        self.step = 0
        state = eng.load_checkpoint(self.engine, cfg.train.run_dir)
        if state is not None:
            self.step = int(state["step"])
            self.loader.load_state_dict(state["loader"])
            eng.set_rng_state(state["rng"])
            log.warning(f"resumed from {eng.latest_tag(cfg.train.run_dir)} at step {self.step}")
        from furnace.metrics import MetricsWriter

        self.writer = MetricsWriter(cfg.train.run_dir, enabled=self.rank == 0)

    def _flop_model(self, model):
        from furnace.metrics import StepShape, flamingo_flops_per_sample

        d = self.cfg.data
        return flamingo_flops_per_sample(model, StepShape(seq_len=d.max_length, images=d.max_images))

    # -------------------------------------------------------------- steps

    def _micro_step(self, it) -> tuple[torch.Tensor, int, int]:
        batch = next(it)
        tokens = int(batch["attention_mask"].sum())
        samples = int(batch["input_ids"].shape[0])
        self.model.check_media(batch["input_ids"], batch["media_valid"])  # on the CPU: no host sync
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss = faults.corrupt_loss(self.engine(batch), self.step + 1)
        self.engine.backward(loss)
        if self.log_gate_grads and self.engine.is_gradient_accumulation_boundary():
            self.gate_grads = self._gate_grads()
        self.engine.step()
        return loss.detach().float(), tokens, samples

    def _train_step(self, it) -> tuple[torch.Tensor, int, int]:
        """One optimizer step: (mean loss over its micro-batches, tokens, samples) on this rank."""
        if self.pipe is not None:
            return self._pipe_step(it)
        losses, tokens, samples = [], 0, 0
        for _ in range(self.grad_accum):
            loss, n_tok, n_s = self._micro_step(it)
            losses.append(loss)
            tokens += n_tok
            samples += n_s
        return torch.stack(losses).mean().cpu(), tokens, samples  # one host sync a step, not one a micro-batch

    def _pipe_step(self, it) -> tuple[torch.Tensor, int, int]:
        """One optimizer step of the pipeline engine (it runs the micro-batches itself). Every
        rank draws the step's micro-batches, so loaders stay in lockstep whatever the stage."""
        from furnace.parallel.pipeline import batch_to_pipe

        batches = [next(it) for _ in range(self.grad_accum)]
        for b in batches:
            self.model.check_media(b["input_ids"], b["media_valid"])
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        samples = sum(int(b["input_ids"].shape[0]) for b in batches)
        loss = self.engine.train_batch(data_iter=iter([batch_to_pipe(b) for b in batches]))
        if self.log_gate_grads:
            self.gate_grads = self._pipe_gate_grads()
        return loss.detach().float().cpu(), tokens, samples

    def _install_gate_hooks(self) -> None:
        """Pipeline: the gates live on different stages; hooks sum each micro-batch's gradient
        (already divided by the accumulation steps) and one all-reduce assembles them."""
        self._gate_names = [f"xattn.{j}.{g}" for j in range(len(self.model.xattn)) for g in ("attn_gate", "ff_gate")]
        self._gate_acc = torch.zeros(len(self._gate_names), dtype=torch.float64)
        owned = {id(p) for p in self.pipe.parameters()}
        for k, name in enumerate(self._gate_names):
            j, g = name.split(".")[1:]
            p = getattr(self.model.xattn[int(j)], g)
            if id(p) in owned:
                p.register_hook(lambda grad, k=k: self._gate_acc.__setitem__(k, self._gate_acc[k] + float(grad.reshape(-1)[0])))

    def _pipe_gate_grads(self) -> dict[str, float]:
        acc = self._gate_acc.clone()
        eng.all_reduce_host(acc)  # owners only; tp peers hold equal values, dp replicas are averaged
        acc /= self.topo.tp * self.dp
        self._gate_acc.zero_()
        return {f"gate_grad/{n}": float(v) for n, v in zip(self._gate_names, acc)}

    def _gate_grads(self) -> dict[str, float]:
        """Full gradients of the xattn tanh gates before the optimizer step (collective under
        ZeRO-3): averaged over the global batch, unclipped and unscaled."""
        from deepspeed.utils import safe_get_full_grad

        out = {}
        for name, p in self.engine.module.named_parameters():
            if name.startswith("xattn.") and name.endswith(("attn_gate", "ff_gate")):
                g = safe_get_full_grad(p)
                out[f"gate_grad/{name}"] = float(g.reshape(-1)[0]) if g is not None else float("nan")
        return out

    def _loss_scale(self):
        opt = self.engine.optimizer
        for name in ("cur_scale", "loss_scale"):
            v = getattr(opt, name, None)
            if isinstance(v, (int, float)):
                return float(v)
        scaler = getattr(opt, "loss_scaler", None)
        return float(getattr(scaler, "cur_scale", 1.0)) if scaler is not None else 1.0

    def _skipped_samples(self) -> int:
        return int(sum(self.loader.skipped.values()))

    def save(self) -> None:
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": eng.rng_state()}
        full = None
        if self.topo.tp > 1 or self.topo.pp > 1:  # export cannot reassemble these offline: gather now
            from furnace.parallel.apply import full_state_dict

            full = full_state_dict(self.model, pipe=self.pipe, topology=self.topo)
        tag = eng.save_checkpoint(self.engine, self.cfg.train.run_dir, self.step, state, eng.config_snapshot(self.cfg),
                                  keep=self.cfg.train.keep_checkpoints, full_state=full)
        log.warning(f"saved checkpoint {tag}")

    def evaluate(self) -> dict:
        from furnace.data.loader import make_loader
        from furnace.data.synthetic import caption_accuracy
        from furnace.evaluate import evaluate_local, refresh_replica, summarize

        if self.replica is None:
            from furnace.model.flamingo import build_from_tokenizer

            self.replica = build_from_tokenizer(self.cfg.model, self.tokenizer).to(self.device)
        if self.pipe is not None:  # gather the stages (and tp shards) into the plain replica
            from furnace.parallel.apply import full_state_dict

            self.replica.load_state_dict(full_state_dict(self.model, pipe=self.pipe, topology=self.topo), strict=False)
        else:
            refresh_replica(self.replica, self.engine.module)
        mean, std = self.vision_stats
        val = make_loader(self.cfg.data, self.tokenizer, split="val", batch_size=4 * self.cfg.train.micro_batch_size,
                          dp_rank=self.topo.coord.dp, dp_size=self.dp, seed=self.cfg.train.seed,
                          image_size=self.image_size, mean=mean, std=std, num_workers=0)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision, torch.float32)
        with torch.autocast(self.device.type if hasattr(self.device, "type") else "cpu", dtype=dtype,
                            enabled=dtype != torch.float32):
            stats, examples = evaluate_local(self.replica, val, self.tokenizer, device=self.device,
                                             max_new_tokens=self.cfg.data.max_length, accuracy_fn=caption_accuracy)
        return summarize(stats, examples, self.topo.get_data_parallel_group())

    def run(self) -> int:
        try:
            self.setup()
            return self._loop()
        except Exception:
            log.exception("training failed")
            raise

    def _loop(self) -> int:
        from tqdm import tqdm

        from furnace.metrics import ThroughputMeter, device_peak_tflops

        t = self.cfg.train
        it = iter(self.loader)
        meter = ThroughputMeter()
        peak = device_peak_tflops()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, desc="train")
        last_eval = None
        while self.step < t.max_steps:
            local, tokens, samples = self._train_step(it)
            self.step += 1
            finite = bool(torch.isfinite(local))
            # one small all-reduce: loss, tokens, samples, non-finite count, stop request, skipped
            stats = torch.tensor([float(local) if finite else 0.0, tokens, samples, 0 if finite else 1,
                                  1 if self.stop_requested else 0, self._skipped_samples()], dtype=torch.float64)
            eng.all_reduce_host(stats)
            n_model = self.world // self.dp  # tp*pp peers repeat the same samples
            loss_val = stats[0].item() / self.world
            if stats[3] > 0 and t.precision != "fp16":
                bad = [None] * self.world
                dist.all_gather_object(bad, (self.rank, finite))
                ranks = [r for r, ok in bad if not ok]
                msg = f"non-finite loss at step {self.step} on rank(s) {ranks}; lower train.lr or check the data"
                log.error(msg)
                raise FloatingPointError(msg)
            meter.add(int(stats[1]) // n_model, int(stats[2]) // n_model,
                      self.flops["train"] * int(stats[2]) / n_model)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                rates = meter.read()
                rec = {
                    "step": self.step, "loss": loss_val, "lr": self.engine.get_lr()[0], "loss_scale": self._loss_scale(),
                    "grad_norm": float(self.engine.get_global_grad_norm() or 0.0), **rates,
                    "skipped_samples": int(stats[5]) // n_model,
                    "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                    "mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else _rss_gb(),
                }
                if peak:
                    rec["mfu"] = rates["tflops"] / self.world / peak
                rec.update(self.gate_grads)
                self.writer.write(rec)
                log.info("step %d %s", self.step, rec)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}", scale=f"{rec['loss_scale']:.0f}",
                                tok_s=f"{rates['tokens_per_s']:.0f}", smp_s=f"{rates['samples_per_s']:.1f}", refresh=False)
            bar.update(1)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                last_eval = self._eval_and_log()
                meter.reset()
            stop = stats[4] > 0
            if (t.save_every and self.step % t.save_every == 0) or stop or self.step == t.max_steps:
                self.save()
                meter.reset()
            if stop:
                bar.close()
                log.warning(f"stopped by SIGTERM at step {self.step}; re-run the same command to resume")
                return 0
        bar.close()
        if t.eval_every:
            last_eval = self._eval_and_log()
        if self.rank == 0 and last_eval is not None:
            print(f"held-out caption accuracy: {last_eval['caption_accuracy']:.3f} "
                  f"({last_eval['val_samples']} samples), val loss {last_eval['val_loss']:.4f}", flush=True)
        self.writer.close()
        dist.barrier()
        return 0

    def _eval_and_log(self) -> dict:
        res = self.evaluate()
        rec = {"step": self.step, "eval/val_loss": res["val_loss"], "eval/caption_accuracy": res["caption_accuracy"]}
        self.writer.write(rec)
        log.warning(f"eval at step {self.step}: val loss {res['val_loss']:.4f}, caption accuracy "
                    f"{res['caption_accuracy']:.3f}; e.g. {res['examples'][:2]}")
        return res


class DPSlice:
    """Micro-batches j of `loader` with j % dp_size == dp_rank (FURNACE_REPLICATED_DATA=1)."""

    def __init__(self, loader, dp_rank: int, dp_size: int):
        self.loader, self.dp_rank, self.dp_size = loader, dp_rank, dp_size

    def __iter__(self):
        for j, batch in enumerate(self.loader):
            if j % self.dp_size == self.dp_rank:
                yield batch

    def __getattr__(self, name):  # state_dict, load_state_dict, skipped ...
        return getattr(self.loader, name)


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


if __name__ == "__main__":
    sys.exit(main())
