"""MCScheme: how the MC label of a row is estimated (K or adaptive K, antithetic masks, control variate,
mask tree), a plain value that validates itself. The maths is in dd_dist.core.mc_schemes; the config's
`label` section and a label manifest's "scheme" entry both become one of these.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MCScheme:
    k: int | None = 100  # masks per row; None: adaptive
    stderr_target: float = 0.005  # adaptive: the MC standard error (largest class) to reach
    k_min: int = 8  # adaptive: masks of the pilot round (both streams), and the step of K
    k_max: int = 400  # adaptive: most masks per row
    antithetic: bool = False
    control_variate: bool = False
    fanout: tuple[int, ...] = ()  # mask tree: branches per sample at the 2nd, 3rd, ... dropout layer

    def __post_init__(self):
        fanout = tuple(self.fanout)  # a manifest or YAML gives a list; trailing 1s change nothing
        while fanout and fanout[-1] == 1:
            fanout = fanout[:-1]
        object.__setattr__(self, "fanout", fanout)
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why this scheme cannot run, in one line; None when it can."""
        unit = self.unit
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.fanout):
            return f"fanout {list(self.fanout)} must list whole numbers >= 1 (samples per sample of the dropout layer above)"
        if self.adaptive:
            if self.k_min % (2 * unit) or self.k_min < 4 * unit:
                return (f"k_min {self.k_min} must be a multiple of {2 * unit} and at least {4 * unit} with k=auto"
                        f"{' and antithetic' if self.antithetic else ''} (two streams of at least two "
                        f"{'antithetic pairs' if self.antithetic else 'masks'} each in the pilot round)")
            if self.k_max < self.k_min or self.k_max % self.k_min:
                return f"k_max {self.k_max} must be a multiple of k_min {self.k_min} (K grows in steps of k_min)"
        elif self.antithetic and self.k % 2:
            return f"k {self.k} must be even with antithetic masks (they come in pairs)"
        elif self.control_variate and self.k < 4 * unit:
            return (f"k {self.k} must be at least {4 * unit} with the control variate (its coefficient is fitted on "
                    f"the other half of the {'pairs' if self.antithetic else 'masks'})")
        return None

    @property
    def adaptive(self) -> bool:
        return self.k is None

    @property
    def plain(self) -> bool:
        """The plain K-mask mean of mc_probs: one stream, no variance reduction."""
        return not (self.adaptive or self.antithetic or self.control_variate or self.fanout)

    @property
    def leaves(self) -> int:
        """Leaf samples under each mask of the first dropout layer."""
        return math.prod(self.fanout)

    @property
    def unit(self) -> int:
        """Masks per unit of the estimate: an antithetic pair or a single mask."""
        return 2 if self.antithetic else 1

    def describe(self) -> str:
        what = [f"K=auto (MC stderr {self.stderr_target:g}, {self.k_min}..{self.k_max} masks)" if self.adaptive
                else f"K={self.k}"]
        tree = [f"fanout {'x'.join(map(str, self.fanout))}"] if self.fanout else []
        return ", ".join(what + tree + ["antithetic masks"] * self.antithetic + ["control variate"] * self.control_variate)

    def record(self) -> dict:
        """What a label manifest stores (the "scheme" entry): enough to rebuild the scheme."""
        out = {"k": "auto" if self.adaptive else self.k, "antithetic": self.antithetic,
               "control_variate": self.control_variate, "streams": 2}
        if self.fanout:
            out["fanout"] = list(self.fanout)
        if self.adaptive:
            out |= {"stderr_target": self.stderr_target, "k_min": self.k_min, "k_max": self.k_max}
        return out

    @classmethod
    def from_record(cls, record: dict | None, k: int) -> MCScheme:
        """The scheme of a manifest: its "scheme" entry, or the plain K-mask mean where there is none."""
        if not record:
            return cls(k=k)
        fields = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in record.items() if key in fields}
        return cls(**{**kept, "k": None if kept["k"] == "auto" else kept["k"]})
