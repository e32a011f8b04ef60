"""Automatic layer groups: parameter names -> named groups in model order.

One rule, used by the trainer's `GradientProbe`, `stabilitylab.Monitor` on any model and the
importers (which only see the parameter names in a log), so the same model gives the same
groups everywhere. Pure Python: no torch needed.

The rule, on dotted parameter names in model order (registration order, which is forward
order for the usual architectures):

1. The *block list* is the list container holding the most parameters whose items are
   modules (`blocks.3.attn.qkv.weight`, `encoder.layer.3...`, `transformer.h.3...`,
   `model.layers.3...`). Each item becomes `blocks.i`, whatever the model calls the list, so
   block i means the same thing in every run. When several such lists sit side by side
   (ResNet's `layer1` ... `layer4`), they are *stages*: one group each, under their own name.
2. The modules the block list sits in are flattened: each of their other children is one
   group named after itself (`patch_embed`, `norm`, `embeddings`, `wte`, `ln_f`, `conv1`,
   `fc`, `head`, `predictor`, ...). Without a block list, the children of the innermost
   module holding everything are the groups.
3. A tensor held directly by a flattened module (`cls_token`, `pos_embed`) is a group of its
   own, placed right after the first layer (where a ViT adds it).
4. `rules={regex: name}` overrides: a parameter whose name matches a regex (`re.search`,
   first rule wins) joins the group `name` (which may use the match's groups, `blocks.\\1`).

`first_layer` is the group holding the model's first layer (the first group that is not a
bare tensor: patch_embed, embeddings, wte, conv1) and `last_block` the group holding the last
block or stage; the run's meta records both and the analysis compares them.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

BLOCKS = "blocks"
_BLOCK_NAME = re.compile(rf"^{BLOCKS}\.(\d+)$")


@dataclass(frozen=True)
class Grouping:
    """Groups in model order, each with its parameter names; the first layer and last block."""

    groups: list[tuple[str, list[str]]]
    first_layer: str | None
    last_block: str | None
    _group_of: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.groups]

    def group_of(self, param: str) -> str:
        return self._group_of[param]

    def restrict(self, params: Iterable[str]) -> "Grouping":
        """The same groups with only `params` (e.g. the trained ones); empty groups dropped.

        first_layer / last_block keep naming the model's structure even when that group is
        frozen (a frozen patch projection is still the first layer; it is just not logged).
        """
        keep = set(params)
        groups = [(g, [p for p in members if p in keep]) for g, members in self.groups]
        groups = [(g, members) for g, members in groups if members]
        return Grouping(groups, self.first_layer, self.last_block,
                        {p: g for g, members in groups for p in members})

    def per_param(self) -> "Grouping":
        """One group per parameter, named by its full name, in the same order."""
        params = [p for _, members in self.groups for p in members]
        first = _member_group(self, self.first_layer, 0)
        last = _member_group(self, self.last_block, -1)
        return Grouping([(p, [p]) for p in params], first, last, {p: p for p in params})


def _member_group(grouping: Grouping, group: str | None, position: int) -> str | None:
    """The first (0) or last (-1) parameter of `group`, or None."""
    members = dict(grouping.groups).get(group)
    return members[position] if members else None


def _block_lists(parts: list[list[str]]) -> tuple[tuple[str, ...] | None, list[tuple[str, ...]]]:
    """(parent path, [list paths]) of the block list, or of the stages; (None, []) if none.

    A candidate list is a path followed by an integer index and at least a module and a
    parameter name (`blocks.0.mlp.weight`; `projector.0.weight` is a layer list, not blocks).
    Lists side by side are stages when their items look alike (share at least half of the
    parameter names after the index, as ResNet's `layer1` ... `layer4` do); a list next to
    unlike ones (the blocks next to a list of heads) stands alone.
    """
    count, indices, items = Counter(), defaultdict(set), defaultdict(set)
    for p in parts:
        for j in range(len(p) - 2):
            if p[j].isdigit():
                path = tuple(p[:j])
                count[path] += 1
                indices[path].add(p[j])
                items[path].add(".".join(p[j + 1:]))
    by_parent: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for path in count:  # first-seen order, so ties go to the first list in the model
        by_parent[path[:-1]].append(path)
    best, best_score = (None, []), 0
    for parent, lists in by_parent.items():
        largest = max(lists, key=lambda p: count[p])
        alike = [p for p in lists if len(items[p] & items[largest]) * 2 >= min(len(items[p]), len(items[largest]))]
        usable = alike if len(alike) > 1 else [largest] if len(indices[largest]) > 1 else []
        score = sum(count[p] for p in usable)
        if usable and score > best_score:
            best, best_score = (parent, usable), score
    return best


def _common_prefix(parts: list[list[str]]) -> tuple[str, ...]:
    """Leading path shared by every name (a wrapper holding everything), leaving >= 2 groups."""
    prefix: list[str] = []
    while parts and all(len(p) > len(prefix) + 2 for p in parts) and \
            len({p[len(prefix)] for p in parts}) == 1:
        prefix.append(parts[0][len(prefix)])
    return tuple(prefix)


def group_parameters(names: Sequence[str], rules: Mapping[str, str] | None = None) -> Grouping:
    """Group dotted parameter names (model order) by the rule in the module docstring."""
    names = list(dict.fromkeys(names))
    parts = [name.split(".") for name in names]
    parent, lists = _block_lists(parts)
    stages = len(lists) > 1
    trunk = parent if parent is not None else _common_prefix(parts)

    auto: dict[str, str] = {}
    kind: dict[str, str] = {}  # group -> "block" | "tensor" | "module"
    for name, p in zip(names, parts):
        under = next((lst for lst in lists if tuple(p[:len(lst)]) == lst), None)
        if under is not None:
            group = under[-1] if stages else f"{BLOCKS}.{p[len(under)]}"
            kind[group] = "block"
        else:
            depth = max(d for d in range(len(trunk) + 1) if tuple(p[:d]) == trunk[:d])
            rest = p[depth:]
            if len(rest) == 1:
                group, kind[rest[0]] = rest[0], "tensor"
            else:
                group = rest[0] if not rest[0].isdigit() or depth == 0 else f"{p[depth - 1]}.{rest[0]}"
                kind.setdefault(group, "module")
        auto[name] = group

    order = _model_order(list(dict.fromkeys(auto.values())), kind)
    first_auto = next((g for g in order if kind[g] != "tensor"), None)
    blocks = [g for g in order if kind[g] == "block"]
    members = defaultdict(list)
    for name in names:
        members[auto[name]].append(name)

    final = {name: _override(name, rules) or auto[name] for name in names}
    final_order = list(dict.fromkeys(final[m] for g in order for m in members[g]))
    groups = [(g, [m for a in order for m in members[a] if final[m] == g]) for g in final_order]
    first = final[members[first_auto][0]] if first_auto else None
    last = final[members[blocks[-1]][-1]] if blocks else None
    return Grouping(groups, first, last, final)


def _model_order(groups: list[str], kind: dict[str, str]) -> list[str]:
    """First-seen order, except: the blocks sorted by index in one run at the first block's
    place (logs may list `blocks.10` before `blocks.2`), and bare tensors right after the
    first layer (or before the blocks when no layer precedes them)."""
    blocks = sorted((g for g in groups if kind[g] == "block"),
                    key=lambda g: int(m.group(1)) if (m := _BLOCK_NAME.match(g)) else -1)
    tensors = [g for g in groups if kind[g] == "tensor"]
    order: list[str] = []
    for g in groups:
        if kind[g] == "block" and blocks:
            order += tensors + blocks
            tensors, blocks = [], []
        elif kind[g] == "module":
            order += [g] + tensors
            tensors = []
    return order + tensors


def _override(name: str, rules: Mapping[str, str] | None) -> str | None:
    for pattern, group in (rules or {}).items():
        match = re.search(pattern, name)
        if match:
            return match.expand(group)
    return None
