"""The training loop: build the run, resume, then steps with logging, evaluation, checkpoint
cadence and signal handling. Started by `furnace.training.launch.main` on every rank.

SIGTERM or SIGINT to any rank stops every rank at the end of the current step (the flag rides
on the step's all-reduce): a due evaluation is skipped, a checkpoint is saved, the exit status
is 0. An error a user can fix (a config, a checkpoint, a busy run_dir) is one line from rank 0
and exit status 2; anything else is one line per failing rank naming its log, and status 1."""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import logger as ds_logger
from tqdm import tqdm

from furnace.config import ConfigError, split_sources
from furnace.data.streams import merge_states
from furnace.model.flamingo_io import architecture
from furnace.parallel.staged import StagedFlamingo
from furnace.parallel.pipeline import batch_to_pipe
from furnace.parallel.topology import Topology
from furnace.training import checkpoint as ckpt
from furnace.training.build import build
from furnace.training.distributed import all_reduce_host, close_distributed, init_distributed
from furnace.training.engine import current_loss_scale, total_grad_norm
from furnace.training.caption_scores import caption_scores
from furnace.training.evaluate import caption_accuracy, evaluate_local, summarize
from furnace.training.faults import Faults
from furnace.training.gate_grads import GateGrads
from furnace.system import usable_cores
from furnace.training.metrics import (MetricsWriter, ThroughputMeter, batch_counts, device_peak_tflops,
                                      peak_memory_gb, step_flops)
from furnace.training.reshard import load_resharded
from furnace.training.resume import agree_on_resume, apply_honoured
from furnace.training.run_lock import RunDirBusy, RunDirLock
from furnace.training.safe_load import UnsafeCheckpointLoading
from furnace.training.stop import StopRequest

log = logging.getLogger("furnace")
log.addHandler(logging.NullHandler())  # nothing reaches the terminal before the rank's log is set up
log.propagate = False
# Errors every rank meets alike and a user can fix: one line, exit status 2.
USER_ERRORS = (ConfigError, ckpt.CheckpointError, RunDirBusy, UnsafeCheckpointLoading, FloatingPointError)


class Trainer:
    def __init__(self, cfg, stop: StopRequest | None = None):
        self.cfg = cfg
        self.stop = stop if stop is not None else StopRequest()
        self.lock: RunDirLock | None = None

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
            sh.addFilter(lambda record: record.levelno < logging.ERROR)  # errors: one line from `run`, tracebacks in the log
            log.addHandler(sh)
        log.setLevel(logging.INFO)
        log.propagate = False

    def _threads(self) -> None:
        """cores / local ranks intra-op threads unless the user set OMP_NUM_THREADS (every rank
        using every core makes ranks on one host fight for them)."""
        if "OMP_NUM_THREADS" in os.environ:
            return
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, usable_cores() // local))

    def setup(self) -> None:
        # DeepSpeed's per-call deprecation warnings would bury the progress bar.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
        ds_logger.setLevel(logging.WARNING)

        cfg = self.cfg
        self.stop.install()  # (again: launch.main installed it before the slow imports)
        self._threads()
        init_distributed(timeout=datetime.timedelta(minutes=cfg.train.dist_timeout_minutes))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._lock_run_dir()
        self._setup_logging(self.rank)
        log.info("pid %d, world %d, host %s, %d threads", os.getpid(), self.world, os.uname().nodename,
                 torch.get_num_threads())
        self.faults = Faults(cfg.debug.faults, self.rank)

        self.topo = Topology(cfg.parallel.tp, cfg.parallel.pp)
        c = self.components = build(cfg, self.topo, progress=self.rank == 0)
        self.tokenizer, self.model, self.pipe, self.engine = c.tokenizer, c.model, c.pipe, c.engine
        self.grad_accum, self.flops, self.loader, self.device = c.grad_accum, c.flops, c.train_loader, c.device
        self.dp = c.dp
        log.info("config (as built): %s", cfg.to_dict())
        # DeepSpeed reports the gradient norm from its ZeRO, bf16 and fp16 optimizers only; with a
        # plain one (ZeRO-0 in fp32) the trainer measures it, on the full gradients of plain DP.
        self.own_grad_norm = not hasattr(self.engine.optimizer, "_global_grad_norm")
        self.grad_norm = float("nan")
        self.meta = {"tokenizer": ckpt.tokenizer_fingerprint(self.tokenizer), "world_size": self.world,
                     "tp": self.topo.tp, "pp": self.topo.pp, "dp": self.dp}
        tag, mode = agree_on_resume(cfg.train.run_dir, cfg, self.meta)
        if self.rank == 0:  # the run carries its tokenizer and architecture: exports need no other path
            self.tokenizer.save_pretrained(Path(cfg.train.run_dir) / "tokenizer")
            (Path(cfg.train.run_dir) / ckpt.ARCHITECTURE).write_text(json.dumps(architecture(self.model), indent=1))
        self.gate_grads = GateGrads(self.model, self.engine, self.pipe, self.topo) if cfg.debug.log_gate_grads else None
        self.step = 0
        if tag is not None:
            if mode == "universal":
                load_resharded(self.engine, self.model, self.topo, cfg.train.run_dir, tag)
                state = ckpt.load_rank_state(cfg.train.run_dir, tag)
            else:
                state = ckpt.load_checkpoint(self.engine, cfg.train.run_dir, tag)
            apply_honoured(self.engine, cfg)
            self.step = int(state["step"])
            try:
                self.loader.load_state_dict(state["loader"])
            except ValueError as e:
                if not cfg.train.allow_config_change:
                    raise
                log.warning(f"the data stream starts over (train.allow_config_change): {e}")
            ckpt.set_rng_state(state["rng"])
            log.warning(f"resumed from {tag} at step {self.step}")
        self.writer = MetricsWriter(cfg.train.run_dir, enabled=self.rank == 0, resume_step=self.step)
        self.evaluates = bool(cfg.train.eval_every and split_sources(cfg.data.val_shards))
        if cfg.train.eval_every and not self.evaluates:
            log.warning("data.val_shards is empty: no evaluation (set it to held-out shards to evaluate)")

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run_dir's lock; every rank learns whether it could (collective)."""
        self.lock = RunDirLock(self.cfg.train.run_dir)
        box = [None]
        if self.rank == 0:
            try:
                self.lock.acquire()
            except RunDirBusy as e:
                box = [str(e)]
            except OSError as e:  # e.g. a read-only or full filesystem: every rank stops alike
                box = [f"cannot lock train.run_dir {self.cfg.train.run_dir}: {e}; choose a writable train.run_dir"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RunDirBusy(box[0])

    # -------------------------------------------------------------- steps

    def _logs(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _micro_step(self, it) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        batch = next(it)
        counts = batch_counts(batch)
        self.model.check_media(batch["input_ids"], batch["media_valid"], batch.get("audio_valid"))  # on the CPU
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss = self.faults.corrupt_loss(self.engine(batch), self.step + 1)
        self.engine.backward(loss)
        if self.gate_grads is not None:
            self.gate_grads.before_step()
        if self.own_grad_norm and self._logs(self.step + 1) and self.engine.is_gradient_accumulation_boundary():
            self.grad_norm = total_grad_norm(self.model)  # reduced over dp by backward, before the clip
        self.engine.step()
        return loss.detach().float(), counts

    def _train_step(self, it) -> tuple[torch.Tensor, list[int]]:
        """One optimizer step: (mean loss over its micro-batches, [tokens, samples, images, clips])
        on this rank."""
        if self.pipe is not None:
            return self._pipe_step(it)
        losses, total = [], [0, 0, 0, 0]
        for _ in range(self.grad_accum):
            loss, counts = self._micro_step(it)
            losses.append(loss)
            total = [a + b for a, b in zip(total, counts)]
        return torch.stack(losses).mean().cpu(), total  # one host sync a step, not one a micro-batch

    def _pipe_step(self, it) -> tuple[torch.Tensor, list[int]]:
        """One optimizer step of the pipeline engine (it runs the micro-batches itself). Every
        rank draws the step's micro-batches, so loaders stay in lockstep whatever the stage."""
        batches = [next(it) for _ in range(self.grad_accum)]
        for b in batches:
            self.model.check_media(b["input_ids"], b["media_valid"], b.get("audio_valid"))
        total = [sum(c) for c in zip(*(batch_counts(b) for b in batches))]
        loss = self.engine.train_batch(data_iter=iter([batch_to_pipe(b, self.model) for b in batches]))
        if self.gate_grads is not None:
            self.gate_grads.after_pipeline_step()
        return loss.detach().float().cpu(), total


    def save(self) -> None:
        # every rank keeps the whole data state, so a resume on another layout finds all streams
        parts = [None] * self.world
        dist.all_gather_object(parts, self.loader.state_dict())
        state = {"step": self.step, "loader": merge_states(parts), "rng": ckpt.rng_state()}
        tag = ckpt.save_checkpoint(self.engine, self.cfg.train.run_dir, self.step, state,
                                   ckpt.config_snapshot(self.cfg), self.meta, keep=self.cfg.train.keep_checkpoints,
                                   faults=self.faults)
        log.warning(f"saved checkpoint {tag}")

    def evaluate(self) -> dict:
        """Validation loss and captions through the training model itself (its TP shards, ZeRO-3
        partitions, pipeline stage): no rank builds a copy of the whole model."""
        staged = self.pipe is not None
        runner = StagedFlamingo(self.model, self.pipe, self.topo) if staged else self.model
        # ZeRO-3 gathers each module's weights with every dp peer: they stop decoding together
        synced = self.topo.get_data_parallel_group() if self.cfg.parallel.zero_stage == 3 and not staged else None
        val = self.components.val_loader(batch_size=4 * self.cfg.train.micro_batch_size)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.train.precision, torch.float32)
        try:
            with torch.autocast(self.device.type if hasattr(self.device, "type") else "cpu", dtype=dtype,
                                enabled=dtype != torch.float32):
                stats, examples = evaluate_local(runner, val, self.tokenizer, device=self.device,
                                                 max_new_tokens=self.cfg.data.max_length, accuracy_fn=caption_accuracy,
                                                 synced_group=synced)
        finally:
            runner.train()
        self.val_skipped = val.skipped
        return summarize(stats, examples, self.topo.get_data_parallel_group())

    def run(self) -> int:
        """The exit status: 0 done or stopped by a signal, 2 an error the user can fix, 1 a failure."""
        rank = int(os.environ.get("RANK", 0))
        try:
            self.setup()
            status = self._loop()
            close_distributed()  # every rank got here: the same steps, the same collectives
            return status
        except KeyboardInterrupt:
            log.error("interrupted by a second SIGINT: no checkpoint saved at this step")
            if rank == 0:
                print("furnace: interrupted (a second Ctrl-C): the last saved checkpoint is kept; re-run the "
                      "same command to resume from it", file=sys.stderr, flush=True)
            return 130
        except USER_ERRORS as e:  # every rank reached the same verdict: rank 0 says it once
            log.error(str(e))
            if rank == 0:
                print(f"furnace: {e}", file=sys.stderr, flush=True)
            return 2
        except Exception as e:
            log.exception("training failed")
            first = (str(e).strip().splitlines() or [""])[0][:300]
            where = Path(self.cfg.train.run_dir) / "logs" / f"rank{rank:03d}.log"
            print(f"furnace: rank {rank} failed: {type(e).__name__}: {first} (traceback in {where})",
                  file=sys.stderr, flush=True)
            return 1
        finally:
            if self.lock is not None:  # a notebook or test harness lives on: free the run_dir
                self.lock.release()

    def _loop(self) -> int:
        t = self.cfg.train
        if self.step >= t.max_steps:  # re-running a finished command must not evaluate or log again
            log.warning(f"the run is already complete at step {self.step} (train.max_steps={t.max_steps}); "
                        "nothing to do: raise train.max_steps to train on")
            self.writer.close()
            return 0
        it = iter(self.loader)
        meter = ThroughputMeter()
        peak = device_peak_tflops()
        # A bar on a terminal; in a log file, one plain line every train.log_every steps instead.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=self.rank != 0 or not interactive,
                   dynamic_ncols=True, desc="train")
        last_eval = None
        while self.step < t.max_steps:
            local, (tokens, samples, images, clips) = self._train_step(it)
            self.step += 1
            finite = bool(torch.isfinite(local))
            # one small all-reduce: loss, tokens, samples, non-finite count, stop request, skipped, media
            stats = torch.tensor([float(local) if finite else 0.0, tokens, samples, 0 if finite else 1,
                                  1 if self.stop else 0, self.loader.skipped_samples, images, clips],
                                 dtype=torch.float64)
            all_reduce_host(stats)
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
                      step_flops(self.flops, int(stats[2]), int(stats[6]), int(stats[7])) / n_model)
            if self._logs(self.step):
                rates = meter.read()
                rec = {
                    "step": self.step, "loss": loss_val, "lr": self.engine.get_lr()[0],
                    "loss_scale": current_loss_scale(self.engine),
                    "grad_norm": self.grad_norm if self.own_grad_norm else float(self.engine.get_global_grad_norm()),
                    **rates,
                    "skipped_samples": int(stats[5]) // n_model,
                    "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                    "mem_gb": peak_memory_gb(),
                }
                if peak:
                    rec["mfu"] = rates["tflops"] / self.world / peak
                if self.gate_grads is not None:
                    rec.update(self.gate_grads.last)
                self.writer.write(rec)
                log.info("step %d %s", self.step, rec)
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{rec['lr']:.2e}", scale=f"{rec['loss_scale']:.0f}",
                                tok_s=f"{rates['tokens_per_s']:.0f}", smp_s=f"{rates['samples_per_s']:.1f}", refresh=False)
                if self.rank == 0 and not interactive:
                    print(f"step {self.step}/{t.max_steps} loss {loss_val:.4f} lr {rec['lr']:.2e} "
                          f"scale {rec['loss_scale']:.0f} tok/s {rates['tokens_per_s']:.0f} "
                          f"samples/s {rates['samples_per_s']:.1f}", file=sys.stderr, flush=True)
            bar.update(1)
            stop = stats[4] > 0
            if self.evaluates and self.step % t.eval_every == 0 and self.step < t.max_steps and not stop:
                last_eval = self._eval_and_log()
                meter.reset()
            if (t.save_every and self.step % t.save_every == 0) or stop or self.step == t.max_steps:
                self.save()
                meter.reset()
            if stop:
                bar.close()
                why = self.stop.name or "a signal to another rank"
                log.warning(f"stopped by {why} at step {self.step}; re-run the same command to resume")
                return 0
        bar.close()
        if self.evaluates:
            last_eval = self._eval_and_log()
        if self.rank == 0 and last_eval is not None:
            print(f"held-out caption accuracy: {last_eval['caption_accuracy']:.3f} "
                  f"({last_eval['val_samples']} samples), CIDEr {last_eval['cider']:.3f}, BLEU-4 "
                  f"{last_eval['bleu4']:.3f}, val loss {last_eval['val_loss']:.4f}", flush=True)
        self.writer.close()
        dist.barrier()
        return 0

    def _eval_and_log(self) -> dict:
        res = self.evaluate()
        if res["val_samples"] == 0:
            log.warning(f"the validation set ({self.cfg.data.val_shards}) gave no usable sample (skipped on rank "
                        f"{self.rank}: {self.val_skipped}); val loss and caption accuracy are NaN: fix data.val_shards")
        rec = {"step": self.step, "eval/val_loss": res["val_loss"], "eval/caption_accuracy": res["caption_accuracy"]}
        if self.rank == 0:  # the field's caption metrics, and every caption next to its reference
            pairs = res["examples"]
            scores = caption_scores({i: p for i, (p, _) in enumerate(pairs)}, {i: [r] for i, (_, r) in enumerate(pairs)})
            res.update(cider=scores.get("CIDEr", float("nan")), bleu4=scores.get("BLEU-4", float("nan")))
            rec.update({"eval/cider": res["cider"], "eval/bleu4": res["bleu4"]})
            out = Path(self.cfg.train.run_dir) / "eval" / f"step{self.step:08d}.json"
            out.parent.mkdir(exist_ok=True)
            samples = [{"prediction": p, "reference": r} for p, r in pairs]
            out.write_text(json.dumps({**{k.removeprefix("eval/"): v for k, v in rec.items()},
                                       "val_samples": res["val_samples"], "scores": scores, "samples": samples},
                                      indent=1))
        self.writer.write(rec)
        log.warning(f"eval at step {self.step}: val loss {res['val_loss']:.4f}, caption accuracy "
                    f"{res['caption_accuracy']:.3f}; e.g. {res['examples'][:2]}")
        return res
