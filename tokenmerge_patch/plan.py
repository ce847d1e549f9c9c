"""A plan is data: :class:`PatchConfig` says which blocks reduce, how much each keeps, and how.

:func:`~tokenmerge_patch.patch` produces one (from ``layers``/``keep_rate``, from a FLOPs budget, or as given),
:func:`~tokenmerge_patch.calibrate` searches one, and ``patch(model, config=plan)`` applies one exactly. Plans
round-trip through JSON:

>>> import json
>>> plan = PatchConfig(layers=(3, 6, 9), keep_rates=(0.7, 0.7, 0.7), depth=12)
>>> PatchConfig.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

from .reduce import METHODS, SCORES, SIMILARITIES

PLAN_FORMAT = "tokenmerge_patch.PatchConfig/1"
FUSE_PROP_ATTN = (
    "prop_attn does not apply to method='fuse': EViT's fused token is a score-weighted sum of its patches, not their "
    "mean, so counting it as all of them in attention over-weights it; patch fuse with prop_attn=False"
)

DENSE_OPTIONS = (
    "{name} does not apply with dense=True: the residual stream keeps every patch, and the tokens a block computes on "
    "are the plain means of their groups' patches, made afresh in every block (eq. 4's weights, the norm a merged "
    "token would carry on and the class token absorbing patches are all about a merged residual stream); patch with "
    "dense=True and without {name}"
)


@dataclass(frozen=True)
class PatchConfig:
    """How a model is patched (see :func:`~tokenmerge_patch.patch` for the meaning of each field).

    Attributes:
        layers: 0-based indices of the reducing blocks, ascending.
        keep_rates: one keep rate in (0, 1] per entry of ``layers``.
        method, similarity, merge_into_cls, size_weighted, keep_norm, prop_attn, trace_source, seed, score, dense: as
            in ``patch`` (a plan without ``score``, written before it existed, scores by the class token; one without
            ``dense`` reduces the residual stream, ``dense=False``).
        depth: number of blocks of the model the plan was made for (``None``: any model deep enough);
            ``patch(model, config=plan)`` refuses a model of another depth.

    A plan says everything explicitly, so its own field defaults are fixed values: ``keep_norm=False`` (as in
    plans written before the option existed), where ``patch(...)`` turns it on by default with ``prop_attn``.
    """

    layers: tuple[int, ...]
    keep_rates: tuple[float, ...]
    method: str = "merge"
    similarity: str = "cosine"
    merge_into_cls: bool = False
    size_weighted: bool = False
    keep_norm: bool = False
    prop_attn: bool = True
    trace_source: bool = False
    seed: int = 0
    depth: int | None = None
    score: str = "cls"
    dense: bool = False

    @property
    def needs_class_token(self) -> bool:
        """Whether the plan reads a class token: its attention scores (``score="cls"``, any method but bipartite) or
        its merges (``merge_into_cls``)."""
        return (self.score == "cls" and self.method != "bipartite") or self.merge_into_cls

    def keep_rate_of(self, layer: int) -> float:
        return self.keep_rates[self.layers.index(layer)]

    def later_layers(self, depth: int) -> tuple[int, ...]:
        """The blocks after the first reduction that do not reduce themselves."""
        return tuple(i for i in range(self.layers[0] + 1, depth) if i not in self.layers)

    def proportional_layers(self, depth: int) -> tuple[int, ...]:
        """With ``prop_attn``: the blocks after the first reduction that do not reduce themselves (they
        attend with ``log(size)`` through their own forward)."""
        return self.later_layers(depth) if self.prop_attn else ()

    def to_dict(self) -> dict:
        """A JSON-safe dict (ints, floats, strings, bools, lists) that :meth:`from_dict` turns back into this plan.

        >>> PatchConfig(layers=(2,), keep_rates=(0.5,)).to_dict()["keep_rates"]
        [0.5]
        """
        data = asdict(self)
        data["layers"], data["keep_rates"] = list(self.layers), list(self.keep_rates)
        return {"format": PLAN_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict) -> PatchConfig:
        """The plan :meth:`to_dict` wrote; ``ValueError``/``TypeError`` naming the field for anything else.

        >>> PatchConfig.from_dict({"layers": [3, 6], "keep_rates": [0.8, 0.6]}).prop_attn  # omitted: defaults
        True
        """
        if not isinstance(data, dict):
            raise TypeError(f"a plan must be a dict (from PatchConfig.to_dict), got {type(data).__name__}")
        data = dict(data)
        found = data.pop("format", PLAN_FORMAT)
        if found != PLAN_FORMAT:
            raise ValueError(f"plan format must be {PLAN_FORMAT!r}, got {found!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan has unknown fields {unknown}; known: {sorted(known)}")
        for name in ("layers", "keep_rates"):
            if name not in data:
                raise ValueError(f"plan needs {name!r}")
            if not isinstance(data[name], (list, tuple)):
                raise TypeError(f"plan field {name!r} must be a list, got {type(data[name]).__name__}")
        plan = cls(**{**data, "layers": tuple(data["layers"]), "keep_rates": tuple(data["keep_rates"])})
        plan.validate()
        return plan

    def validate(self, depth: int | None = None) -> PatchConfig:
        """Check every field (and, given ``depth``, that the plan fits a model with that many blocks); return
        the plan with numbers as plain ints and floats. ``TypeError``/``ValueError`` naming the field."""
        if not self.layers:
            raise ValueError("plan layers must name at least one block")
        if len(self.keep_rates) != len(self.layers):
            raise ValueError(f"plan has {len(self.layers)} layers but {len(self.keep_rates)} keep_rates")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, Integral) or layer < 0:
                raise TypeError(f"plan layers must be block indices (ints >= 0), got {layer!r}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"plan layers must be ascending without repeats, got {list(self.layers)}")
        for rate in self.keep_rates:
            if isinstance(rate, bool) or not isinstance(rate, Real) or not 0.0 < float(rate) <= 1.0:
                raise ValueError(f"plan keep_rates must be numbers in (0, 1], got {rate!r}")
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.similarity, str) or self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.similarity != "cosine" and self.method != "merge":
            raise ValueError(f"similarity applies to method='merge' only, got method={self.method!r}")
        for name in ("merge_into_cls", "size_weighted", "keep_norm", "prop_attn", "trace_source", "dense"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("merge_into_cls", "size_weighted", "keep_norm"):
            if getattr(self, name) and self.method != "merge":
                raise ValueError(f"{name} applies to method='merge' only, got method={self.method!r}")
        if self.method == "fuse" and self.prop_attn:
            raise ValueError(FUSE_PROP_ATTN)
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.merge_into_cls and self.score != "cls":
            raise ValueError("merge_into_cls lets the class token absorb tokens: it needs score='cls'")
        for name in ("merge_into_cls", "size_weighted", "keep_norm"):
            if self.dense and getattr(self, name):
                raise ValueError(DENSE_OPTIONS.format(name=name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, Integral)):
            raise TypeError(f"plan depth must be an int or None, got {self.depth!r}")
        if depth is not None:
            if self.depth is not None and self.depth != depth:
                raise ValueError(f"this plan was made for a model with {self.depth} blocks; this model has {depth}")
            if self.layers[-1] >= depth:
                raise ValueError(f"plan layers {list(self.layers)} do not fit a model with blocks 0..{depth - 1}")
        return PatchConfig(
            layers=tuple(int(layer) for layer in self.layers),
            keep_rates=tuple(float(rate) for rate in self.keep_rates),
            method=self.method,
            similarity=self.similarity,
            merge_into_cls=self.merge_into_cls,
            size_weighted=self.size_weighted,
            keep_norm=self.keep_norm,
            prop_attn=self.prop_attn,
            trace_source=self.trace_source,
            seed=int(self.seed),
            depth=None if self.depth is None else int(self.depth),
            score=self.score,
            dense=self.dense,
        )


def check_fraction(value: object, name: str) -> float:
    """A number strictly between 0 and 1 (a FLOPs budget)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__} {value!r}")
    fraction = float(value)
    if not (0.0 < fraction < 1.0) or math.isnan(fraction):
        raise ValueError(f"{name} must be in (0, 1) (a fraction of the unpatched model's FLOPs), got {value!r}")
    return fraction
