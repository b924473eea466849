"""Pipeline training of a split model on ``torch.distributed`` (gloo on CPU, NCCL on GPU), one stage per rank.

Each rank builds the chain on the meta device, allocates its own stage only, opens it from the locked container
with its own licence, folds random boundary maps into it (:mod:`chiplock.split.boundary`, drawn by the first
rank of each crossing stream and sent only to the ranks that share the stream), and trains with
``torch.distributed.pipelining`` (GPipe or 1F1B). Every ``rotate_every`` steps the maps are redrawn and the
weights and optimiser state moved to the new maps. At the end each rank unfolds its maps and locks its trained
stage on its own: ``out/stageI.chiplock`` and ``out/stageI.keys``. Launch with ``torchrun`` (see
:mod:`chiplock.split.train` and docs/split.md); :func:`train_single` is the single-process reference.
"""

from __future__ import annotations

import gc
import json
import resource
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from chiplock.errors import OutputError, UnsupportedConfig
from chiplock.split.boundary import BoundaryMap, crossing, fold, random_boundary, unfold
from chiplock.split.shards import LAYOUT_FILE, MODEL_FILE, digest, load_stage, save_stage
from chiplock.split.units import Layout, Stream, Units, build_stage, build_units

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class SplitTrainSpec:
    """One pipeline training run; JSON-serialisable so every torchrun rank reads the same one.

    Args:
        split_dir: The folder ``chiplock split lock`` wrote: ``model.chiplock``, ``split.json``, ``stageI.lic``.
        out: An existing folder for the trained parts (``stageI.chiplock``, ``stageI.keys``) and the per-rank
            reports (``rankI.json``).
        profile: Device profile to unlock as (``None``: measure this device).
        secret_file: File holding the vendor secret the licences were issued with, if any.
        data: ``mnist5000`` or ``digits8`` (:func:`chiplock.softlock.pipeline.load_dataset`), or a
            ``.safetensors`` file (:func:`load_data`).
        max_train: Use only the first N training images.
        epochs: Passes over the training set.
        batch_size: Images per step (a multiple of ``microbatches``; the last partial batch is dropped).
        microbatches: Microbatches per step in the pipeline schedule.
        optimizer: ``adam`` or ``sgd`` (with ``momentum``).
        lr: Learning rate.
        momentum: SGD momentum.
        seed: Seed of the data order.
        schedule: ``gpipe`` or ``1f1b``.
        boundary: Fold random boundary maps into the stages (else train the plain weights).
        rotate_every: Redraw the maps every N steps (0: never; the maps drawn at the start stay).
        scale_range: Range of the maps' positive channel scales; ``(1, 1)`` draws permutations only.
        optimizer_state: On rotation, ``transform`` the optimiser state with the weights or ``reset`` it.
        threads: torch threads per rank.
        version: Schema version.
    """

    split_dir: str
    out: str
    profile: str | None = None
    secret_file: str | None = None
    data: str = "mnist5000"
    max_train: int | None = None
    epochs: int = 1
    batch_size: int = 64
    microbatches: int = 4
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    seed: int = 0
    schedule: str = "gpipe"
    boundary: bool = True
    rotate_every: int = 0
    scale_range: tuple[float, float] = (0.5, 2.0)
    optimizer_state: str = "transform"
    threads: int = 1
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise ValueError(f"SplitTrainSpec version {self.version} is not supported (this chiplock knows 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.optimizer_state not in ("transform", "reset"):
            raise ValueError(f"optimizer_state={self.optimizer_state!r}: use transform or reset")
        if self.batch_size < 1 or self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of microbatches="
                             f"{self.microbatches}")
        if self.epochs < 1 or self.rotate_every < 0 or self.threads < 1 or self.lr <= 0:
            raise ValueError("epochs and threads must be positive, lr positive, rotate_every zero or more")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range={self.scale_range!r}: pass (low, high) with 0 < low <= high")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SplitTrainSpec:
        """Parse a spec written by :meth:`to_json`.

        Raises:
            UnsupportedConfig: Not a spec, an unknown field, or a bad value.
        """
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            extra = sorted(set(data) - known)
            if extra:
                raise ValueError(f"unknown field(s) {', '.join(extra)}")
            if "scale_range" in data:
                data["scale_range"] = tuple(data["scale_range"])
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise UnsupportedConfig(f"split training spec is malformed: {e}") from None


def batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """The index batches of one epoch: a seeded shuffle, the last partial batch dropped (every rank and the
    single-process reference see the same order)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for i in range(0, n - batch_size + 1, batch_size):
        yield order[i:i + batch_size]


def make_optimizer(params: Any, spec: SplitTrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)


def load_data(spec: SplitTrainSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of ``spec.data``: a named data set, or a ``.safetensors`` file
    holding those four tensors (what the tests and a pre-processed data set use)."""
    if spec.data.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            d = load_file(spec.data)
            x, y, xt, yt = (d[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        except (OSError, KeyError, RuntimeError) as e:
            raise UnsupportedConfig(f"data file {spec.data!r} must be a safetensors file holding x_train, "
                                    f"y_train, x_test and y_test ({e})") from None
    else:
        from chiplock.softlock.pipeline import load_dataset

        d = load_dataset(spec.data)
        x, y, xt, yt = d.x_train, d.y_train, d.x_test, d.y_test
    if spec.max_train is not None:
        x, y = x[:spec.max_train], y[:spec.max_train]
    return x, y, xt, yt


def train_single(units: Units, spec: SplitTrainSpec, data: tuple | None = None, *,
                 microbatched: bool = False) -> dict[str, Any]:
    """Train the whole chain in one process with the same data order and optimiser (the reference).

    Args:
        units: The chain (trained in place).
        spec: The run's settings (``split_dir`` and ``out`` are not used).
        data: ``(x_train, y_train, x_test, y_test)``; ``None`` loads ``spec.data``.
        microbatched: Accumulate each batch's gradient over ``spec.microbatches`` microbatches, as the pipeline
            schedule does, so batch norm sees the same microbatches (else one forward pass per batch).

    Returns:
        ``{"accuracy", "losses", "step_s"}``.
    """
    x, y, xt, yt = data if data is not None else load_data(spec)
    opt = make_optimizer(units.parameters(), spec)
    losses, times = [], []
    chunks = spec.microbatches if microbatched else 1
    units.train()
    for epoch in range(spec.epochs):
        for idx in batches(len(y), spec.batch_size, spec.seed, epoch):
            t0 = time.perf_counter()
            opt.zero_grad()
            total = 0.0
            for part in idx.chunk(chunks):
                loss = F.cross_entropy(units(x[part]), y[part]) / chunks
                loss.backward()
                total += float(loss.detach())
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(total)
    units.eval()
    with torch.no_grad():
        correct = sum(int((units(xt[i:i + 512]).argmax(1) == yt[i:i + 512]).sum()) for i in range(0, len(yt), 512))
    return {"accuracy": correct / len(yt), "losses": losses, "step_s": times}


def _exchange(dist: Any, rank: int, streams: tuple[Stream, ...], shared: dict[str, tuple[int, ...]],
              spec: SplitTrainSpec) -> dict[str, BoundaryMap]:
    """Draw fresh maps for the crossing streams this rank touches: the stream's first rank draws it and sends it
    to the stream's other ranks only, so no rank learns the maps of boundaries it is not next to."""
    maps = {}
    for s in streams:
        ranks = shared.get(s.name)
        if not ranks or rank not in ranks:
            continue
        owner = ranks[0]
        if rank == owner:
            m = random_boundary(s.width, scale_range=spec.scale_range)
            for peer in ranks[1:]:
                dist.send(m.perm, peer)
                dist.send(m.scale, peer)
        else:
            perm, scale = torch.empty(s.width, dtype=torch.int64), torch.empty(s.width, dtype=torch.float64)
            dist.recv(perm, owner)
            dist.recv(scale, owner)
            m = BoundaryMap(perm, scale)
        maps[s.name] = m
    return maps


def held_tensors(stage: nn.Module) -> dict[str, Any]:
    """What this process holds: every live parameter not on the meta device (found through the garbage
    collector, so a stray copy of another stage shows up), and the digests of every live tensor."""
    own = {id(p) for p in stage.parameters()}
    params = foreign = foreign_bytes = 0
    digests = set()
    with warnings.catch_warnings():
        # isinstance on some deprecated torch module attributes warns; they are not tensors anyway.
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in live:
        if obj.is_meta or obj.numel() < 2:
            continue
        if isinstance(obj, nn.Parameter):
            params += obj.numel() * obj.element_size()
            if id(obj) not in own:
                foreign += 1
                foreign_bytes += obj.numel() * obj.element_size()
        if obj.dim() > 0 and not obj.is_sparse:
            digests.add(digest(obj))
    return {"param_bytes": params, "foreign_params": foreign, "foreign_param_bytes": foreign_bytes,
            "digests": sorted(digests)}


def _secret(spec: SplitTrainSpec) -> bytes | None:
    if spec.secret_file is None:
        return None
    return Path(spec.secret_file).read_bytes().strip()


def run_rank(spec: SplitTrainSpec) -> dict[str, Any]:
    """Train this rank's stage (call inside an initialised process group of ``len(stages)`` ranks).

    Returns:
        The rank's report (also written to ``out/rankI.json``): the stage's tensors (names, sizes, digests of the
        weights it opened), what the process held after opening and after training, step and rotation times,
        and on the last rank the losses and the test accuracy.

    Raises:
        UnsupportedConfig: The world size is not the number of stages.
        OutputError: ``out`` already holds this rank's stage or keys.
    """
    import torch.distributed as dist

    torch.set_num_threads(spec.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = Layout.from_json((Path(spec.split_dir) / LAYOUT_FILE).read_text())
    if world != len(layout.stages):
        raise UnsupportedConfig(f"this split has {len(layout.stages)} stages but {world} ranks were started; run "
                                f"torchrun --nproc-per-node {len(layout.stages)} (or that many over all nodes)")
    out = Path(spec.out)
    taken = [p.name for p in (out / f"stage{rank}.chiplock", out / f"stage{rank}.keys") if p.exists()]
    if taken:
        # Checked before training: the keys of an earlier run are never replaced (they are its only copy).
        raise OutputError(f"{spec.out!r} already holds {', '.join(taken)} from an earlier run; pass another --out")
    stage, streams = _open_stage(spec, layout, rank)
    report: dict[str, Any] = {
        "rank": rank, "stage": rank, "units": list(layout.stages[rank]),
        "tensors": {n: {"numel": t.numel(), "bytes": t.numel() * t.element_size(), "digest": digest(t)}
                    for n, t in stage.state_dict().items()},
        "held_after_load": held_tensors(stage)}
    stage_of = {e.name: layout.stage_of(e.name) for s in streams for e in s.entries}
    rotor = _Rotor(dist, rank, streams, crossing(streams, stage_of) if spec.boundary else {}, spec)
    rotor.start(stage)
    report["maps"] = sorted(rotor.maps)
    report.update(_train(spec, layout, stage, rotor, dist, rank, world))
    rotor.finish(stage)
    save_stage(stage, out / f"stage{rank}.chiplock", rank, content_keys_path=out / f"stage{rank}.keys", force=True)
    report["trained"] = {n: digest(t) for n, t in stage.state_dict().items()}
    report["held_after_train"] = held_tensors(stage)
    report["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return report


def _open_stage(spec: SplitTrainSpec, layout: Layout, rank: int) -> tuple[Units, tuple[Stream, ...]]:
    """Materialise this rank's stage alone and open it with this rank's licence."""
    from chiplock.profile import DeviceProfile

    split = Path(spec.split_dir)
    stage, streams = build_stage(layout, rank)
    profile = DeviceProfile.load(spec.profile) if spec.profile else None
    load_stage(stage, split / MODEL_FILE, rank, license=split / f"stage{rank}.lic", profile=profile,
               secret=_secret(spec))
    return stage, streams


class _Rotor:
    """The boundary maps of one rank: drawn at the start, redrawn every ``rotate_every`` steps, undone at the end."""

    def __init__(self, dist: Any, rank: int, streams: tuple[Stream, ...], shared: dict[str, tuple[int, ...]],
                 spec: SplitTrainSpec) -> None:
        self.dist, self.rank, self.streams, self.shared, self.spec = dist, rank, streams, shared, spec
        self.maps: dict[str, BoundaryMap] = {}
        # Per rotation: wall time (including waiting for the ranks it exchanges maps with) and folding alone.
        self.seconds: list[float] = []
        self.fold_seconds: list[float] = []

    def start(self, stage: nn.Module) -> None:
        self.maps = _exchange(self.dist, self.rank, self.streams, self.shared, self.spec)
        fold(stage, self.maps, self.streams)

    def step(self, stage: nn.Module, step: int, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """After optimiser step ``step``: rotate when due; returns the optimiser to go on with."""
        if not (self.spec.rotate_every and self.maps and step % self.spec.rotate_every == 0):
            return opt
        t0 = time.perf_counter()
        new = _exchange(self.dist, self.rank, self.streams, self.shared, self.spec)
        t1 = time.perf_counter()
        delta = {s: self.maps[s].inverse().then(new[s]) for s in self.maps}
        keep = self.spec.optimizer_state == "transform"
        fold(stage, delta, self.streams, optimizer=opt if keep else None)
        if not keep:
            opt = make_optimizer(stage.parameters(), self.spec)
        self.maps = new
        t2 = time.perf_counter()
        self.seconds.append(t2 - t0)
        self.fold_seconds.append(t2 - t1)
        return opt

    def finish(self, stage: nn.Module) -> None:
        unfold(stage, self.maps, self.streams)


def _train(spec: SplitTrainSpec, layout: Layout, stage: Units, rotor: _Rotor, dist: Any, rank: int,
           world: int) -> dict[str, Any]:
    """The training loop of one rank, then the pipelined evaluation: step times, losses, accuracy."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    first, last = rank == 0, rank == world - 1
    x, y, xt, yt = load_data(spec)
    # Rank 0 keeps the images, the last rank the labels.
    x, xt = (x, xt) if first else (None, None)
    y, yt = (y, yt) if last else (None, None)
    n_train = _broadcast_len(dist, len(y) if last else 0, world)
    # Static shapes: without them the stage infers its shapes by a forward pass on uninitialised inputs in
    # training mode, which writes garbage (even NaN) into batch-norm running statistics.
    shapes = boundary_shapes(layout, spec.batch_size // spec.microbatches)
    pstage = PipelineStage(stage, rank, world, torch.device("cpu"), input_args=shapes[rank],
                           output_args=shapes[rank + 1], input_grads=None if first else shapes[rank],
                           output_grads=None if last else shapes[rank + 1])
    schedule = (ScheduleGPipe if spec.schedule == "gpipe" else Schedule1F1B)(
        pstage, spec.microbatches, loss_fn=F.cross_entropy)
    opt = make_optimizer(stage.parameters(), spec)
    step_s, losses, step = [], [], 0
    stage.train()
    for epoch in range(spec.epochs):
        for idx in batches(n_train, spec.batch_size, spec.seed, epoch):
            t0 = time.perf_counter()
            opt.zero_grad()
            mb: list = []
            if first:
                schedule.step(x[idx])
            elif last:
                schedule.step(target=y[idx], losses=mb)
            else:
                schedule.step()
            opt.step()
            step_s.append(time.perf_counter() - t0)
            if last:
                losses.append(sum(float(v.detach()) for v in mb) / len(mb))
            step += 1
            opt = rotor.step(stage, step, opt)
    n_test = _broadcast_len(dist, len(yt) if last else 0, world)
    result = {"step_s": step_s, "rotation_s": rotor.seconds, "fold_s": rotor.fold_seconds, "steps": step,
              "accuracy": _evaluate(schedule, stage, spec, first, last, xt, yt, n_test=n_test)}
    if last:
        result["losses"] = losses
    return result


def boundary_shapes(layout: Layout, microbatch: int) -> list[torch.Tensor]:
    """Meta tensors of the activation entering each stage (and leaving the last) for one microbatch, from a pass
    through the chain on the meta device (no memory, no weights)."""
    units, _ = build_units(layout.arch, device="meta")
    x = torch.empty(microbatch, 1, layout.arch.image_size, layout.arch.image_size, device="meta")
    out = [x]
    # With grad: a stage's input must be marked as needing one, or no gradient flows back to the stage before.
    for names in layout.stages:
        for name in names:
            x = getattr(units, name)(x)
        out.append(x.detach().requires_grad_(True))
    return out


def _broadcast_len(dist: Any, n: int, world: int) -> int:
    """The last rank (which holds the labels) tells every rank how many examples there are."""
    t = torch.tensor([n], dtype=torch.int64)
    dist.broadcast(t, world - 1)
    return int(t)


def _evaluate(schedule: Any, stage: nn.Module, spec: SplitTrainSpec, first: bool, last: bool,
              xt: torch.Tensor | None, yt: torch.Tensor | None, *, n_test: int) -> float | None:
    """Test accuracy through the pipeline (forward only), in training-size batches (the stages' buffers were
    shaped by the first step), the last one padded."""
    stage.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, n_test, spec.batch_size):
            if first:
                xb = xt[i:i + spec.batch_size]
                if len(xb) < spec.batch_size:
                    xb = torch.cat([xb, xb.new_zeros((spec.batch_size - len(xb), *xb.shape[1:]))])
                schedule.eval(xb)
            elif last:
                yb = yt[i:i + spec.batch_size]
                # The schedule computes the loss of every microbatch, so the padding gets labels too.
                out = schedule.eval(target=torch.cat([yb, yb.new_zeros(spec.batch_size - len(yb))]))
                correct += int((out[:len(yb)].argmax(1) == yb).sum())
            else:
                schedule.eval()
    stage.train()
    return correct / n_test if last else None


__all__ = ["SplitTrainSpec", "batches", "held_tensors", "load_data", "make_optimizer", "run_rank", "train_single"]
