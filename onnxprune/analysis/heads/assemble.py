"""Turning a merged block into a :class:`~onnxprune.analysis.removal.PruneGroup` (engine mixin).

:class:`GroupAssembly` walks each stream back from its split reshape to the projection that made
it (through Identity/Cast, constant-bias Add, last-axis Split/Slice, last-axis-keeping
Reshapes and 3-D RotaryEmbedding, to MatMul/Gemm/MatMulNBits with a constant weight), collects
parameter slices (``W = min n`` units, ``len / W`` consecutive channels each), and resolves every literal shape element that
holds a head count or ``H*D`` to an initializer element or attribute to shrink
(:func:`element_source`). Anything it cannot account for blocks the group with a reason.
The methods rely on the engine's helpers (``_need``, ``const``, ``producer``, ``consumers`` ...).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import onnx

from onnxprune.analysis.heads.state import Blocked, Comp
from onnxprune.analysis.nbits import is_nbits, nbits_of, support_problem
from onnxprune.analysis.removal import IOSlice, ParamSlice, PruneGroup, ShapeEdit
from onnxprune.ir.graph import attr_dict
from onnxprune.ir.ops import SHAPE_ONLY


class GroupAssembly:
    """Engine mixin: groups from merged blocks."""

    def groups(self) -> list[PruneGroup]:
        roots = sorted({self.find(c) for c in range(len(self.parent))})
        out = []
        for r in roots:
            comp = self.comps[r]
            if self.mode == "heads" and comp.cores == 0:
                continue
            if self.mode == "ffn" and comp.activations == 0:
                continue
            out.append(self.assemble(comp))
        return out

    def assemble(self, comp: Comp) -> PruneGroup:
        blocked = list(comp.blocked)
        width = min(comp.ns) if comp.ns else 0
        name = group_name(comp, self.mode)
        group = PruneGroup(name=name, width=width, members=list(comp.members))
        if width < 1 or any(n % width for n in comp.ns):
            blocked.append(f"head counts {sorted(comp.ns)} have no common unit")
            width = max(width, 1)
        width = self._align_units(comp, width, blocked)
        if not comp.exits:
            blocked.append("no output projection (MatMul/Gemm with a constant weight) found")
        slices: list[ParamSlice] = []
        edits: dict[tuple[str, str, int | str], int] = defaultdict(int)
        split_cov: dict[str, dict[int, int]] = defaultdict(dict)
        self._slice_cov: dict[str, list[tuple[str, int, int, int]]] = defaultdict(list)
        back_refs: dict[tuple[str, int, int], int] = defaultdict(int)
        path = set(comp.path_nodes)
        for tensor, offset, length, start in comp.streams:
            try:
                self.walk_back(comp, tensor, offset, length, width, slices, split_cov, back_refs, path, start)
            except Blocked as exc:
                blocked.append(f"projection of {start!r}: {exc}")
        for init, axis, off, length, role, tag in comp.params:
            if length % width:
                blocked.append(f"{init!r}: {length} channels are not a multiple of {width} units")
                continue
            slices.append(ParamSlice(init, axis, role, off, length // width, None, tag))  # type: ignore[arg-type]
        for node_name, idx, pos, contrib, how in comp.shape_refs:
            try:
                self.shape_edit(comp, node_name, idx, pos, contrib, width, how, edits)
            except Blocked as exc:
                blocked.append(f"{how} {node_name!r}: {exc}")
        for (node_name, idx, pos), contrib in back_refs.items():
            node = self.nodes[node_name]
            total = self.need_shape(node.output[0])[pos]
            if contrib != total:
                blocked.append(f"reshape {node_name!r} carries {total} channels but the block owns {contrib}")
                continue
            try:
                self.shape_edit(comp, node_name, idx, pos, contrib, width, "reshape", edits)
            except Blocked as exc:
                blocked.append(f"reshape {node_name!r}: {exc}")
        for source, pieces in self._slice_cov.items():
            self._slice_edits(source, pieces, width, edits, blocked)
        for split_name, cov in split_cov.items():
            node = self.nodes[split_name]
            outs = [o for o in node.output]
            if set(cov) != set(range(len(outs))):
                blocked.append(f"Split {split_name!r} has outputs outside the block")
                continue
            sizes_input = node.input[1] if len(node.input) > 1 and node.input[1] else ""
            attrs = attr_dict(node)
            for k, contrib in cov.items():
                if contrib % width:
                    blocked.append(f"Split {split_name!r} output {k}: {contrib} not a multiple of {width}")
                elif sizes_input:
                    if self.const(sizes_input) is None:
                        blocked.append(f"Split {split_name!r}: sizes are not constant")
                    else:
                        edits[("initializer", sizes_input, k)] += contrib // width
                elif "split" in attrs:
                    edits[("attribute", split_name, f"split[{k}]")] += contrib // width
            if not sizes_input and "split" not in attrs and len(set(cov.values())) != 1:
                blocked.append(f"Split {split_name!r} splits equally but its outputs shrink unequally")
        for node_name, attr, value in comp.attr_edits:
            if value % width:
                blocked.append(f"{node_name!r} {attr}={value} is not a multiple of {width}")
            else:
                edits[("attribute", node_name, attr)] += value // width
        for tensor, axis, length, kind in dict.fromkeys(comp.io):
            if length % width:
                blocked.append(f"{kind} {tensor!r}: {length} KV heads are not a multiple of {width} units")
            else:
                group.io_slices.append(IOSlice(tensor, axis, 0, length // width, kind))  # type: ignore[arg-type]
        self._check_consumers(comp, path, blocked)
        group.slices = dedupe(slices)
        group.shape_edits = [ShapeEdit(k, t, i, pc) for (k, t, i), pc in edits.items() if pc]  # type: ignore[arg-type]
        group.width = width
        group.blocked = "; ".join(dict.fromkeys(blocked)) if blocked else None
        return group

    def _align_units(self, comp: Comp, width: int, blocked: list[str]) -> int:
        """Units whose input positions in a ``MatMulNBits`` exit are whole quantisation blocks.

        A unit owns ``K / width`` consecutive inputs of the exit; removal may only drop whole
        blocks of ``block_size``. FFN neurons are grouped into units of whole blocks (the width
        shrinks); attention heads are never merged: a head group that would split a block blocks.
        """
        for node_name, length, bs in comp.align:
            if width < 1 or length % width:
                continue
            per = length // width
            if per % bs == 0:
                continue
            factor = bs // math.gcd(per, bs)
            if self.mode == "ffn" and width % factor == 0 and width // factor >= 2:
                width //= factor
                comp.members.append(f"units of {per * factor} neurons: whole {bs}-blocks of {node_name}")
                continue
            unit = "KV-head group" if self.mode == "heads" else "neuron"
            blocked.append(f"MatMulNBits {node_name!r}: one {unit} owns {per} of its {length} inputs, not a multiple "
                           f"of block_size {bs}, so removing it would split quantisation blocks")
        return width

    def walk_back(self, comp: Comp, tensor: str, offset: int, length: int, width: int,
                  slices: list[ParamSlice], split_cov: dict[str, dict[int, int]],
                  back_refs: dict[tuple[str, int, int], int], path: set[str], start: str) -> None:
        if length % width:
            raise Blocked(f"{length} channels are not a multiple of {width} units")
        block = length // width
        cur = tensor
        for _ in range(64):
            node = self.producer.get(cur)
            if node is None:
                raise Blocked(f"{cur!r} is not produced by a projection")
            path.add(node.name)
            comp.channel_tensors.setdefault(cur, len(self.need_shape(cur)) - 1)
            op = node.op_type
            if op in ("Identity", "Cast"):
                cur = node.input[0]
            elif op == "Add":
                consts = [x for x in node.input if self.const(x) is not None]
                others = [x for x in node.input if self.const(x) is None]
                if len(consts) != 1 or len(others) != 1:
                    raise Blocked(f"Add {node.name!r} is not projection + constant bias")
                bias = self.const(consts[0])
                assert bias is not None
                if bias.size > 1:
                    if bias.shape[-1] != self.need_shape(cur)[-1] or bias.size != bias.shape[-1]:
                        raise Blocked(f"bias {consts[0]!r} is not per channel")
                    if len(self.consumers.get(consts[0], [])) > 1:
                        raise Blocked(f"bias {consts[0]!r} is shared")
                    slices.append(ParamSlice(consts[0], bias.ndim - 1, "out", offset, block, None, "bias"))
                cur = others[0]
            elif is_nbits(node):
                nw = nbits_of(self.model, node)
                if nw is None or cur != node.output[0]:
                    raise Blocked(f"MatMulNBits {node.name!r} has no constant weight")
                problem = support_problem(self.model, nw)
                if problem:
                    raise Blocked(problem)
                self._raise_if_shared(nw.weight, node)
                slices.append(ParamSlice(nw.weight, 0, "out", offset, block, None, "weight"))
                if nw.bias:
                    slices.append(ParamSlice(nw.bias, 0, "out", offset, block, None, "bias"))
                return
            elif op == "RotaryEmbedding" and node.domain in ("", "ai.onnx", "com.microsoft"):
                self._rotary_back(comp, node, offset, block)
                cur = node.input[0]
            elif op == "MatMul":
                w = self.const(node.input[1])
                if w is None or w.ndim != 2 or self.const(node.input[0]) is not None:
                    raise Blocked(f"MatMul {node.name!r} has no constant 2-D weight")
                self._raise_if_shared(node.input[1], node)
                slices.append(ParamSlice(node.input[1], 1, "out", offset, block, None, "weight"))
                return
            elif op == "Gemm":
                attrs = attr_dict(node)
                w = self.const(node.input[1])
                if w is None or attrs.get("transA", 0):
                    raise Blocked(f"Gemm {node.name!r} has no constant weight")
                self._raise_if_shared(node.input[1], node)
                slices.append(ParamSlice(node.input[1], 0 if attrs.get("transB", 0) else 1, "out", offset, block,
                                         None, "weight"))
                if len(node.input) > 2 and node.input[2]:
                    cb = self.const(node.input[2])
                    if cb is None:
                        raise Blocked(f"Gemm {node.name!r} bias is not constant")
                    if cb.size > 1:
                        slices.append(ParamSlice(node.input[2], cb.ndim - 1, "out", offset, block, None, "bias"))
                return
            elif op == "Split":
                rank = len(self.need_shape(node.input[0]))
                if int(attr_dict(node).get("axis", 0)) % rank != rank - 1:
                    raise Blocked(f"Split {node.name!r} is not along the channel axis")
                k = list(node.output).index(cur)
                sizes = [self.need_shape(o)[-1] for o in node.output]
                offset += sum(sizes[:k])
                split_cov[node.name][k] = split_cov[node.name].get(k, 0) + length
                cur = node.input[0]
            elif op == "Slice":
                start_, end_ = self._last_axis_slice(node)
                self._slice_cov[node.input[0]].append((node.name, start_, end_, length))
                offset += start_
                cur = node.input[0]
            elif op == "Reshape":
                i, o = self.need_shape(node.input[0]), self.need_shape(node.output[0])
                if i[-1] != o[-1]:
                    raise Blocked(f"Reshape {node.name!r} changes the channel axis")
                back_refs[(node.name, 1, len(o) - 1)] += length
                cur = node.input[0]
            else:
                raise Blocked(f"cannot trace through {op} {node.name!r}")
        raise Blocked("projection chain too long")

    def _rotary_back(self, comp: Comp, node: onnx.NodeProto, offset: int, block: int) -> None:
        """A 3-D ``RotaryEmbedding`` ``[B, S, H*D]`` between a projection and the attention op.

        It rotates each head on its own (cos/sin per position and within-head index), so whole
        heads pass; ``num_heads`` (when set) shrinks with them.
        """
        shape = self.need_shape(node.input[0])
        if len(shape) != 3:
            raise Blocked(f"RotaryEmbedding {node.name!r}: a {len(shape)}-D input before the attention op")
        attrs = attr_dict(node)
        heads = int(attrs.get("num_heads", 0))
        if heads:
            head = shape[-1] // heads
        else:
            cos_slot = 2 if node.domain == "com.microsoft" else 1
            cos = self.shape(node.input[cos_slot]) if len(node.input) > cos_slot else None
            rot = int(attrs.get("rotary_embedding_dim", 0))
            if not cos or rot:
                raise Blocked(f"RotaryEmbedding {node.name!r}: head size unknown (no num_heads)")
            head = 2 * cos[-1]
        if head < 1 or block % head or offset % head:
            raise Blocked(f"RotaryEmbedding {node.name!r}: units of {block} channels do not hold whole heads of {head}")
        if heads:
            comp.attr_edits.append((node.name, "num_heads", heads))

    def _last_axis_slice(self, node: onnx.NodeProto) -> tuple[int, int]:
        """``(start, end)`` of a step-1 Slice along the last axis with constant bounds."""
        dims = self.need_shape(node.input[0])
        rank = len(dims)
        consts = [self.const(x) if len(node.input) > k and node.input[k] else None for k, x in
                  ((k, node.input[k] if len(node.input) > k else "") for k in range(5))]
        starts, ends = consts[1], consts[2]
        axes = consts[3] if consts[3] is not None else (np.arange(len(starts)) if starts is not None else None)
        if starts is None or ends is None or axes is None:
            raise Blocked(f"Slice {node.name!r} bounds are not constant")
        axes = [int(a) % rank for a in axes.reshape(-1)]
        if axes != [rank - 1] or (consts[4] is not None and int(consts[4].reshape(-1)[0]) != 1):
            raise Blocked(f"Slice {node.name!r} is not a step-1 slice of the channel axis only")
        total = dims[-1]
        start, end = int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
        start = min(max(start + total if start < 0 else start, 0), total)
        end = min(max(end + total if end < 0 else end, 0), total)
        return start, end

    def _slice_edits(self, source: str, pieces: list[tuple[str, int, int, int]], width: int,
                     edits: dict[tuple[str, str, int | str], int], blocked: list[str]) -> None:
        """Slices of one fused projection: every channel must belong to a piece; bounds shift."""
        total = self.need_shape(source)[-1]
        spans = sorted({(a, b, c) for _, a, b, c in pieces})
        covered = 0
        for a, b, c in spans:
            if a != covered or b - a != c:
                blocked.append(f"slices of {source!r} do not tile it into head-aligned pieces")
                return
            covered = b
        other = [n for n in self.consumers.get(source, []) if n.op_type != "Slice" and n.op_type not in SHAPE_ONLY]
        if covered != total or other:
            blocked.append(f"fused projection {source!r} has channels outside the attention block")
            return
        for name, a, b, _ in dict.fromkeys(pieces):
            node = self.nodes[name]
            before_start = sum(c // width for s0, e0, c in spans if e0 <= a)
            before_end = sum(c // width for s0, e0, c in spans if e0 <= b)
            for slot, shift, value in ((1, before_start, a), (2, before_end, b)):
                raw = int(self.const(node.input[slot]).reshape(-1)[0])
                if raw < 0:
                    blocked.append(f"Slice {name!r}: bound {raw} counts from the end of a shrinking axis")
                    continue
                if shift == 0 or raw >= (1 << 31):
                    continue  # 0 stays 0; "to the end" (INT_MAX) needs no edit
                edits[("initializer", node.input[slot], 0)] += shift

    def _raise_if_shared(self, init: str, node: onnx.NodeProto) -> None:
        users = {n.name for n in self.consumers.get(init, [])}
        if len(users) > 1:
            raise Blocked(f"weight {init!r} of {node.name} is shared with {sorted(users - {node.name})[:3]}")

    def shape_edit(self, comp: Comp, node_name: str, idx: int, pos: int, contrib: int, width: int, how: str,
                   edits: dict[tuple[str, str, int | str], int]) -> None:
        node = self.nodes[node_name]
        src = element_source(self, node.input[idx], pos)
        if src is None:
            raise Blocked(f"cannot resolve element {pos} of its shape input")
        kind = src[0]
        if kind == "const":
            _, init, flat, value = src
            if how == "reshape" and value == -1:
                return
            if how == "expand" and value == 1:
                return
            if how == "reshape" and value == 0 and not attr_dict(node).get("allowzero", 0):
                src_axis = comp.channel_tensors.get(node.input[0])
                if src_axis == pos:
                    return
                raise Blocked(f"shape element {pos} copies an input dim that does not carry the heads")
            if value != contrib:
                raise Blocked(f"shape element {pos} is {value}, expected {contrib}")
            if contrib % width:
                raise Blocked(f"{contrib} is not a multiple of {width} units")
            edits[("initializer", init, flat)] += contrib // width
            return
        _, tensor, axis = src
        if comp.channel_tensors.get(tensor) == axis:
            return
        raise Blocked(f"shape element {pos} is read from {tensor!r} axis {axis}, which does not shrink with the block")

    def _check_consumers(self, comp: Comp, path: set[str], blocked: list[str]) -> None:
        for tensor in comp.channel_tensors:
            if tensor in self.outputs and tensor not in self.ann:
                blocked.append(f"graph output {tensor!r} carries the {self.what()}")
            for user in self.consumers.get(tensor, []):
                if user.name not in path and user.op_type not in SHAPE_ONLY:
                    blocked.append(f"{tensor!r} is also read by {user.op_type} {user.name!r}")


def element_source(eng: GroupAssembly, tensor: str, pos: int, depth: int = 0) -> tuple | None:
    """Where element ``pos`` of a 1-D int tensor comes from.

    Returns ``("const", initializer, flat_index, value)``, ``("shape", tensor, axis)`` or None.
    """
    if depth > 16:
        return None
    value = eng.const(tensor)
    if value is not None:
        flat = value.reshape(-1)
        if pos >= flat.size:
            return None
        return ("const", tensor, pos, int(flat[pos]))
    node = eng.producer.get(tensor)
    if node is None:
        return None
    op = node.op_type
    if op == "Concat":
        start = 0
        for x in node.input:
            s = eng.shape(x)
            n = int(np.prod(s)) if s is not None else None
            if n is None:
                return None
            if pos < start + n:
                return element_source(eng, x, pos - start, depth + 1)
            start += n
        return None
    if op in ("Unsqueeze", "Cast", "Identity", "Squeeze", "Reshape"):
        return element_source(eng, node.input[0], pos, depth + 1)
    if op == "Slice" and len(node.input) >= 3:
        starts = eng.const(node.input[1])
        steps = eng.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        length = eng.shape(node.input[0])
        if starts is None or length is None or len(length) != 1 or (steps is not None and int(steps[0]) != 1):
            return None
        first = int(starts.reshape(-1)[0])
        first = min(max(first + length[0] if first < 0 else first, 0), length[0])
        return element_source(eng, node.input[0], first + pos, depth + 1)
    if op == "Where" and len(node.input) == 3:
        # torch's expand(-1 -> keep) idiom: Where(x == -1, ones, x); the data element is x's
        return element_source(eng, node.input[2], pos, depth + 1)
    if op in ("Mul", "Div") and len(node.input) == 2:
        # shape-of-annotated * constant shrinks in proportion (e.g. Hkv * n_rep); constants don't
        consts = [eng.const(x) for x in node.input]
        k = 0 if consts[0] is None else 1
        if consts[1 - k] is None or consts[1 - k].size != 1 or (op == "Div" and k == 1):
            return None
        inner = element_source(eng, node.input[k], pos if eng.shape(node.input[k]) != [] else 0, depth + 1)
        return inner if inner is not None and inner[0] == "shape" else None
    if op == "Shape":
        attrs = attr_dict(node)
        rank = len(eng.need_shape(node.input[0])) if eng.shape(node.input[0]) else None
        start = int(attrs.get("start", 0))
        if start < 0 and rank is not None:
            start += rank
        return ("shape", node.input[0], start + pos)
    if op == "Gather":
        idx = eng.const(node.input[1])
        data = eng.producer.get(node.input[0])
        if idx is None or data is None or data.op_type != "Shape":
            return None
        flat = idx.reshape(-1)
        if pos >= flat.size:
            return None
        rank = max(1, int(np.prod(eng.shape(node.input[0]) or [1])))  # length of the Shape vector
        return element_source(eng, node.input[0], int(flat[pos]) % rank, depth + 1)
    return None


def dedupe(slices: list[ParamSlice]) -> list[ParamSlice]:
    return list(dict.fromkeys(slices))


def group_name(comp: Comp, mode: str) -> str:
    if comp.exits:
        return f"{mode}:{comp.exits[0][0]}"
    if comp.streams:
        return f"{mode}:{comp.streams[0][3]}"
    return f"{mode}:{comp.members[0] if comp.members else '?'}"
