"""Students: small SequentialTeacher-family models, one per segment, fp32 or int8.

A student is the teacher's architecture at a smaller size (``TeacherConfig``), optionally
over a *segment catalogue* (the items that cover most of the segment's interactions): its
local ids are 0 padding, 1 "an item outside the catalogue" (an input only, never scored),
2.. the catalogue. Its ``forward`` takes and returns what the teacher's scorer does — one
(B, 3, L) int64 tensor of global item/type/gap ids -> (B, N) scores over the *global*
catalogue, ``-inf`` for items it does not score — so evaluation and scoring treat every
model alike.

``Int8Student`` runs a compressed file: every large tensor (item table, the blocks' weights)
stored int8 with per-row scales, sparse when pruned (see ``Int8Student`` for its two
runtimes). Files of both kinds are written by ``to_bytes`` / ``quantized_bytes`` and read by
``from_bytes`` (``store``: no pickle).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from patternlake.models import store
from patternlake.models.teacher import SequentialTeacher, TeacherConfig

OOV = 1  # local id of an item outside a student's catalogue


def count_params(config: TeacherConfig) -> int:
    """Parameters of a SequentialTeacher-family model of this configuration (embeddings
    counted), without building it."""
    d, L, r = config.d_model, config.n_layers, config.item_rank
    items = config.n_items * r + r * d if r else config.n_items * d
    emb = items + (config.n_types + config.n_gaps + config.max_len) * d
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    head = config.n_items * int(config.item_bias) + 2 * d * config.adapter_rank
    return emb + L * block + 2 * d + int(config.seen_bias) + head


class Student(nn.Module):
    def __init__(self, config: TeacherConfig, n_global: int, catalogue: np.ndarray | None):
        """``catalogue``: the global ids the student scores (None: all of them, ids as is)."""
        super().__init__()
        self.config = config
        self.n_global = n_global
        self.net = SequentialTeacher(config)
        if catalogue is None:
            if config.n_items != n_global:
                raise ValueError("a whole-catalogue student has the teacher's n_items")
            self.catalogue = None
        else:
            catalogue = np.asarray(catalogue, dtype=np.int64)
            if config.n_items != len(catalogue) + 2:
                raise ValueError("n_items must be the catalogue size + 2 (padding, outside)")
            to_local = np.full(n_global, OOV, dtype=np.int64)
            to_local[0] = 0
            to_local[catalogue] = np.arange(2, len(catalogue) + 2)
            self.register_buffer("to_local", torch.from_numpy(to_local), persistent=False)
            self.register_buffer("to_global", torch.from_numpy(catalogue), persistent=False)
            self.catalogue = catalogue

    def local(self, items: torch.Tensor) -> torch.Tensor:
        return items if self.catalogue is None else self.to_local[items]

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Training targets in local ids; a target outside the catalogue is ignored (0)."""
        if self.catalogue is None:
            return targets
        t = self.to_local[targets]
        return torch.where(t == OOV, torch.zeros_like(t), t)

    def hidden(self, items, types, gaps) -> torch.Tensor:
        return self.net.encode(self.local(items), types, gaps)

    def seen_last(self, items: torch.Tensor) -> torch.Tensor | None:
        """(B, L) global inputs -> (B, n_local) bool: in the window (the teacher's seen term,
        in local ids); None without ``seen_bias``."""
        if not self.config.seen_bias:
            return None
        return SequentialTeacher.window(self.local(items), self.config.n_items)

    def seen_positions(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """(B, L) global inputs -> (M, n_local) bool at the ``mask``-ed positions."""
        return self.net.seen(self.local(items))[mask] if self.config.seen_bias else None

    def local_scores(self, hidden: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(…, D) -> (…, n_local) scores; padding and "outside" are -inf. ``seen``: the
        window mask of ``seen_last`` / ``seen_positions`` (models with ``seen_bias``)."""
        s = self.net.scores(hidden)
        if seen is not None:
            s = self.net.with_seen(s, seen)
        s[..., 0] = float("-inf")
        if self.catalogue is not None:
            s[..., OOV] = float("-inf")
        return s

    def to_global_scores(self, local: torch.Tensor) -> torch.Tensor:
        if self.catalogue is None:
            return local
        out = torch.full(
            (*local.shape[:-1], self.n_global),
            float("-inf"),
            dtype=local.dtype,
            device=local.device,
        )
        out[..., self.to_global] = local[..., 2:]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x[:, 0], x[:, 1], x[:, 2])[:, -1]
        return self.to_global_scores(self.local_scores(h, self.seen_last(x[:, 0])))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- files ---------------------------------------------------------------------------
    def metadata(self, **extra: Any) -> dict[str, Any]:
        return {
            "kind": "student",
            "config": self.config.to_dict(),
            "n_global": self.n_global,
            "params": self.num_params(),
            **extra,
        }

    def to_bytes(self, **extra: Any) -> bytes:
        tensors: dict[str, Any] = dict(self.state_dict())
        if self.catalogue is not None:
            tensors["catalogue"] = self.catalogue.astype(np.int32)
        return store.dumps(tensors, self.metadata(**extra))


def student_from_arrays(
    tensors: dict[str, np.ndarray], meta: dict[str, Any], runtime: str = "dequant"
) -> nn.Module:
    """A model file's contents -> Student (kind student) or Int8Student (kind student_int8)."""
    if meta.get("kind") == "student_int8":
        return Int8Student.from_arrays(tensors, meta, runtime)
    if meta.get("kind") != "student":
        raise ValueError(f"not a student model file (kind {meta.get('kind')!r})")
    catalogue = tensors.pop("catalogue", None)
    model = Student(TeacherConfig(**meta["config"]), int(meta["n_global"]), catalogue)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    return model.eval()


def from_bytes(
    data: bytes, runtime: str = "dequant", base: bytes | nn.Module | None = None
) -> nn.Module:
    """A model file -> its model; a segment head's file (kind ``student_head``) needs the
    shared student it specialises, ``base``: its file, or the model built from it once for
    several heads (dequantized: a head always runs on fp32 kernels, whatever ``runtime``)."""
    tensors, meta = store.loads(data)
    if meta.get("kind") != "student_head":
        return student_from_arrays(tensors, meta, runtime)
    if base is None:
        raise ValueError(f"a segment head needs its base student's file (v{meta.get('base')})")
    if not isinstance(base, nn.Module):
        base = from_bytes(base)
    return apply_head(base, tensors, meta)


# -- segment heads ---------------------------------------------------------------------------

HEAD_PARTS = ("net.ln.", "net.item_bias", "net.adapter.")  # what a head trains and stores


def is_head_tensor(name: str) -> bool:
    return name.startswith(HEAD_PARTS)


def with_head(base: nn.Module, item_bias: bool, adapter_rank: int) -> Student:
    """A new fp32 student on ``base``'s weights (an int8 base: its dequantized weights) with a
    head: an item bias (zeros), an adapter (rank ``adapter_rank``; the identity) and a copy
    of the base's final norm, so it scores exactly as the base until the head is trained.
    Every other tensor *is* the base's (shared storage, not a copy): the heads of one shared
    student hold its body and item table once."""
    shell = base.shell if isinstance(base, Int8Student) else base
    if not isinstance(shell, Student):
        raise TypeError(f"a head specialises a student, not {type(base).__name__}")
    config = TeacherConfig(
        **{**shell.config.to_dict(), "item_bias": item_bias, "adapter_rank": adapter_rank}
    )
    out = Student(config, shell.n_global, shell.catalogue)
    theirs = {k: v for k, v in shell.named_parameters() if not k.startswith(HEAD_PARTS[1:])}
    mine = dict(out.named_parameters())
    extra = [k for k in mine if k not in theirs and not is_head_tensor(k)]
    if extra or set(theirs) - set(mine):
        raise ValueError(f"head over a different network: {extra or set(theirs) - set(mine)}")
    with torch.no_grad():
        for name, p in mine.items():
            if name not in theirs:
                continue
            if is_head_tensor(name):  # the final norm: the head's own copy
                p.copy_(theirs[name])
            else:
                p.data = theirs[name].data
    return out.eval()


def head_params(model: Student) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if is_head_tensor(name)]


def head_bytes(model: Student, base_version: str, **extra: Any) -> bytes:
    """A segment head's file: only the head's tensors (final norm, item bias, adapter),
    naming the shared student version whose other weights it runs on."""
    tensors = {k: v for k, v in model.state_dict().items() if is_head_tensor(k)}
    meta = model.metadata(**extra)
    meta.update(
        kind="student_head",
        base=str(base_version),
        head_params=sum(int(v.numel()) for v in tensors.values()),
    )
    return store.dumps(tensors, meta)


def apply_head(base: nn.Module, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Student:
    config = TeacherConfig(**meta["config"])
    model = with_head(base, config.item_bias, config.adapter_rank)
    own = dict(model.named_parameters())
    if set(tensors) != {k for k in own if is_head_tensor(k)}:
        raise ValueError(f"a head file with tensors {sorted(tensors)} does not fit this base")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(torch.from_numpy(v))
    return model.eval()


# -- int8 -------------------------------------------------------------------------------------


def large_tensors(model: Student) -> list[str]:
    """Names (in ``model.state_dict()``) of the tensors pruning and int8 apply to: every 2-D
    weight (the item, type, gap and position tables; the attention projections, the MLP).
    Norms and biases stay fp32."""
    return [name for name, t in model.state_dict().items() if t.dim() == 2]


def quantized_bytes(model: Student, **extra: Any) -> bytes:
    """The int8 file of a (possibly pruned) fp32 student: large tensors packed int8 (sparse
    when pruned), the rest (norms, biases, small embeddings) fp32."""
    state = model.state_dict()
    big = set(large_tensors(model))
    tensors: dict[str, Any] = {}
    for name, t in state.items():
        if name in ("to_local", "to_global"):
            continue
        if name in big:
            for part, a in store.pack_int8(t).items():
                tensors[f"{name}::{part}"] = a
        else:
            tensors[name] = t.float()
    if model.catalogue is not None:
        tensors["catalogue"] = model.catalogue.astype(np.int32)
    meta = model.metadata(**extra)
    meta["kind"] = "student_int8"
    meta["int8"] = sorted(big)
    return store.dumps_packed(tensors, meta)


RUNTIMES = ("dequant", "dynamic")


class Int8Student(nn.Module):
    """The int8 runtime of a student file.

    ``dequant`` (default): the int8 weights are dequantized once at load and the model runs
    in fp32: int8 is the storage format (4x+ smaller files and downloads), and the scores
    differ from the pruned fp32 model's only by the weights' rounding. ``dynamic``: the
    transformer's Linear layers and the output scoring (an int8 ``Linear`` holding the item
    table; a quantized embedding cannot be the tied output layer) run through PyTorch's
    dynamic int8 kernels, which also quantize each batch's activations to int8 with one
    scale per tensor. bench/compress.py measures both (speed and top-10 agreement) on this
    machine; docs/students.md has the numbers behind the default."""

    def __init__(self, fp32: Student, packed: dict[str, dict[str, np.ndarray]], runtime: str):
        super().__init__()
        if runtime not in RUNTIMES:
            raise ValueError(f"int8 runtime must be one of {RUNTIMES}, not {runtime!r}")
        self.runtime = runtime
        self.config = fp32.config
        self.n_global = fp32.n_global
        self.catalogue = fp32.catalogue
        self.shell = fp32  # dequantized weights
        self.out = None
        if runtime == "dynamic":
            q, scale = store.unpack_int8(packed["net.item_emb.weight"])
            out = nn.Linear(q.shape[1], q.shape[0], bias=False)
            out.weight.data = torch.from_numpy(q.astype(np.float32) * scale[:, None])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated for torchao
                from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

                spec = {nn.Linear: per_channel_dynamic_qconfig}
                self.out = quantize_dynamic(nn.Sequential(out), spec)
                self.shell.net.blocks = quantize_dynamic(self.shell.net.blocks, spec)

    @classmethod
    def from_arrays(
        cls, tensors: dict[str, np.ndarray], meta: dict[str, Any], runtime: str = "dequant"
    ) -> Int8Student:
        catalogue = tensors.pop("catalogue", None)
        fp32 = Student(TeacherConfig(**meta["config"]), int(meta["n_global"]), catalogue)
        packed: dict[str, dict[str, np.ndarray]] = {}
        plain: dict[str, torch.Tensor] = {}
        for key, a in tensors.items():
            if "::" in key:
                name, part = key.split("::")
                packed.setdefault(name, {})[part] = a
            else:
                plain[key] = torch.from_numpy(a)
        for name, p in packed.items():
            plain[name] = store.dequantize(p)
        fp32.load_state_dict(plain)
        return cls(fp32.eval(), packed, runtime).eval()

    def num_params(self) -> int:
        return self.shell.num_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out is None:
            return self.shell(x)
        h = self.shell.hidden(x[:, 0], x[:, 1], x[:, 2])[:, -1]
        s = self.out(h)
        seen = self.shell.seen_last(x[:, 0])
        if seen is not None:
            s = self.shell.net.with_seen(s, seen)
        s[:, 0] = float("-inf")
        if self.catalogue is not None:
            s[:, OOV] = float("-inf")
        return self.shell.to_global_scores(s)
