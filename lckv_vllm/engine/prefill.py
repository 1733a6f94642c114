"""The iterative prefill of cyclic segments: zero start, passes, the pass economy, adaptive stopping, blocks, telemetry.

A cyclic segment runs up to `plan.prefill_passes(longest query)` (min(m + b, longest)) passes over a step's tokens,
every pass from the same segment input, with the step's producer slots zeroed first (docs/semantics.md).

* **Pass economy.**  After pass k the first k tokens of every query are exact and stay so, so pass k + 1 recomputes
  only each query's tokens from index k on; the exact ones are read from the pages as context.  A decode row batched
  with a prompt runs once.
* **Adaptive passes** (`LCKV_PREFILL_TOL` > 0, the default).  Every pass from the second on measures, per token, how
  far it moved the K/V of the segment's producers: `max over producers ||x_new - x_old|| / ||x_new||`, x = that
  token's K and V over all KV heads, as written to the pages.  A sequence's *first unconverged token* is its first
  recomputed token whose change exceeds the tolerance; the next pass recomputes only from there on (the tokens
  before it are final), and a sequence with none stops iterating.  This generalises the economy (exact tokens move
  by 0), never exceeds m + b passes, and is causal: the decision at token t depends on tokens <= t only, so a
  prompt prefix gets the same K/V whatever follows it (prefix caching stays consistent) and a sequence's passes do
  not depend on what it is batched with.  Tolerance 0 disables the stop: always min(m + b, length) passes, the
  exact m+b-pass result.  The float64 oracle implements the same rule (`ReferenceModel.forward_chunk`).
* **Prefill blocks** (`Settings.block`, chunked prefill only).  A step whose tokens cross a multiple of the block
  size runs in rounds: round j takes every request's j-th block as a sub-step, iterated on top of the blocks before
  it, final by then (the chunk-by-chunk semantics inside one step; `ReferenceModel.forward_chunk(block=)`).  Tokens
  with final context converge in fewer passes.
* **Split passes** (adaptive mode; `segments.SplitUnits`).  The top layer of a cyclic segment is a
  producer, and of a pass that is not a row's last only that producer's K/V matters: so a pass runs the layers
  below it and its K/V write, and its attention and MLP run once per row, after the pass that made the row final.
  A first pass without context skips the upward reads too (they see only zeroed slots: exactly 0).  The values are
  those of full passes.
* **Telemetry.**  Per prefill (a request's multi-token query in a step): the passes it used and the change of its
  last pass, kept in `PrefillStats` (read by lckv-serve's /metrics through the worker extension), and one warning
  per engine when a prompt longer than m + b is still moving more than the tolerance after m + b passes: such a
  checkpoint's outputs depend on how prompts are split into steps.

Under tensor parallelism each rank holds some KV heads, so the squared norms are summed over the ranks before the
ratio is taken: every rank sees the same change and recomputes the same tokens.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

from .attention.context import metadata_swapped
from .attention.step import LCKVStep, pass_substep, substep
from .lora import AdapterRows
from .segments import SegmentUnits
from ..plan import LayerPlan
from ..settings import CHUNKED_PREFILL_ENV, DEFAULT_PREFILL_TOL, PREFILL_TOL_ENV, Settings

logger = logging.getLogger("lckv_vllm")

_NONE = 1 << 62  # "no unconverged token" in a per-request minimum


def row_change(new: torch.Tensor, old: torch.Tensor, tp_reduce=None) -> torch.Tensor:
    """Per-token relative change `max_p ||new_p - old_p|| / ||new_p||` of K/V captures `[P, T, D]` -> `[T]`.

    A token whose K/V is all zeros and did not move has change 0 (a moved one: inf).  `tp_reduce` sums the squared
    norms over tensor-parallel ranks (each holds some of the heads)."""
    sq = torch.stack([(new - old).float().pow(2).sum(-1), new.float().pow(2).sum(-1)])  # [2, P, T]
    if tp_reduce is not None:
        sq = tp_reduce(sq)
    d2, n2 = sq[0], sq[1]
    ratio = torch.where(n2 > 0, d2 / n2.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.where(d2 > 0, torch.full_like(d2, float("inf")), torch.zeros_like(d2)))
    return ratio.sqrt().amax(0)


class PrefillStats:
    """Convergence telemetry of one engine's prefills (thread-safe snapshot for the metrics RPC)."""

    def __init__(self, max_passes: int, tolerance: float):
        self.max_passes = max_passes
        self.tolerance = tolerance
        self.passes = [0] * (max_passes + 1)  # passes[k]: prefills that used k passes over their cyclic segments
        self.prefills = 0
        self.prefill_tokens = 0
        # rows the cyclic segments ran over for these prefills, all passes, per segment: / prefill_tokens = the
        # passes' cost in units of one pass over every token (what blocks and the adaptive stop save)
        self.recomputed_tokens = 0.0
        self.unconverged = 0  # prefills longer than m+b still moving more than the tolerance after m+b passes
        self.last_change: float | None = None  # the change measured by the last pass of the latest prefill
        # requests whose tokens in a step were all generated ones, re-encoded one per sub-step (resume.py): the
        # verify steps of speculative decoding, and the generated part of a request resumed after preemption;
        # not prefills, so counted apart
        self.reencoded = 0
        self.reencoded_tokens = 0
        self._lock = threading.Lock()

    def record(self, passes: list[int], tokens: list[int], changes: list[float], unconverged: int,
               recomputed: float = 0.0) -> None:
        with self._lock:
            self.recomputed_tokens += recomputed
            for k in passes:
                self.passes[min(k, self.max_passes)] += 1
            self.prefills += len(passes)
            self.prefill_tokens += sum(tokens)
            self.unconverged += unconverged
            if changes:
                self.last_change = changes[-1]

    def record_reencoded(self, tokens: list[int]) -> None:
        with self._lock:
            self.reencoded += len(tokens)
            self.reencoded_tokens += sum(tokens)

    def snapshot(self) -> dict:
        with self._lock:
            return {"max_passes": self.max_passes, "tolerance": self.tolerance, "passes": list(self.passes),
                    "prefills": self.prefills,
                    "prefill_tokens": self.prefill_tokens, "recomputed_tokens": self.recomputed_tokens,
                    "unconverged": self.unconverged, "last_change": self.last_change,
                    "reencoded": self.reencoded, "reencoded_tokens": self.reencoded_tokens}


class IterativePrefill:
    """Runs the cyclic segments of one model (or pipeline stage); one per engine, built by `LCKVModel`."""

    def __init__(self, plan: LayerPlan, settings: Settings, tp_reduce=None, adapters: AdapterRows | None = None):
        self.plan = plan
        self.adapters = adapters  # LoRA: each sub-step's tokens keep their adapters (lora.py)
        self.settings = settings
        # use_sequential makes every token exact (one pass per token): it never stops early
        self.tol = settings.prefill_tol if settings.adaptive and not plan.use_sequential else 0.0
        # with tolerance 0 the change is still measured, for telemetry, against the default tolerance
        self.yardstick = self.tol or DEFAULT_PREFILL_TOL
        self.measure = settings.pass_economy
        # a use_sequential plan encodes one token per pass and stays whole; blocks change nothing it computes
        self.block = 0 if plan.use_sequential else settings.block
        self._tp_reduce = tp_reduce
        self.stats = PrefillStats(plan.num_passes, self.tol)
        self._warned = False

    # ---- one step --------------------------------------------------------------------------------------------------
    def begin_step(self, step: LCKVStep) -> "_StepRecord":
        if self.adapters is not None:
            self.adapters.begin_step(step)
        return _StepRecord(step.num_reqs)

    @contextlib.contextmanager
    def substep_scope(self, sub: LCKVStep):
        """Run the body on sub-step `sub`: the layers read its attention metadata and its tokens' LoRA adapters."""
        with metadata_swapped(sub), (self.adapters.scope(sub) if self.adapters is not None else
                                     contextlib.nullcontext()):
            yield

    def run(self, units: SegmentUnits, positions, hidden, step: LCKVStep, record: "_StepRecord", parts=None):
        """One segment of the step: an acyclic one once; a cyclic one iteratively, part by part when the step
        re-encodes generated tokens (`parts` from `resume.plan_step`: the prompt part, then one token at a time)."""
        if not units.cyclic:
            return units.run(positions, hidden)
        if parts is None:
            return self.run_segment(units, positions, hidden, step, record)
        out = hidden.clone()
        for part in parts:
            with self.substep_scope(part.step):
                h = self.run_segment(units, positions.index_select(0, part.rows), hidden.index_select(0, part.rows),
                                     part.step, record, passes=part.passes, rows_of_step=part.reqs)
            out.index_copy_(0, part.rows, h)
        return out

    def run_segment(self, units: SegmentUnits, positions, seg_in, step: LCKVStep, record: "_StepRecord",
                    passes: int | None = None, rows_of_step: torch.Tensor | None = None):
        """One cyclic segment over `step` (the whole step, or a part of it: then `rows_of_step` maps the part's
        requests to the step's, for the record).  Returns the segment's output.

        A step whose tokens cross a prefill-block boundary (`Settings.block`) runs block by block: round j takes
        every request's j-th block of the step (decode rows in round 0), as a sub-step, iterated on top of the
        blocks before it, which are final by then."""
        if passes is None or passes > 1:
            blocks = self._blocks(step)
            if blocks is not None:
                out = torch.empty_like(seg_in)
                for rows, sub, reqs in blocks:
                    with self.substep_scope(sub):
                        h = self._run_one(units, positions.index_select(0, rows), seg_in.index_select(0, rows),
                                          sub, record, None, reqs if rows_of_step is None else rows_of_step[reqs])
                    out.index_copy_(0, rows, h)
                return out
        return self._run_one(units, positions, seg_in, step, record, passes, rows_of_step)

    def _blocks(self, step: LCKVStep):
        """The step's prefill blocks as rounds `(rows, sub-step, requests)`, or None when no request's tokens cross a
        multiple of the block size.  Cached on the step: every cyclic segment uses the same rounds."""
        C = self.block
        if C <= 0 or step.max_query_len <= 1:
            return None
        if step.prefill_blocks is None:
            ctx, q = step.context_lens_cpu, step.query_lens_cpu
            first = ctx // C  # block index of each request's first token in the step
            count = (ctx + q - 1) // C - first + 1  # blocks each request's step tokens touch
            if int(count.max()) <= 1:
                step.prefill_blocks = ()
            else:
                rounds = []
                for j in range(int(count.max())):
                    reqs = (count > j).nonzero().flatten()
                    lo = ((first[reqs] + j) * C - ctx[reqs]).clamp_min(0)
                    hi = torch.minimum((first[reqs] + j + 1) * C - ctx[reqs], q[reqs])
                    rows, sub = substep(step, reqs, lo, hi - lo)
                    rounds.append((rows, sub, reqs))
                step.prefill_blocks = tuple(rounds)
        return step.prefill_blocks or None

    def _run_one(self, units: SegmentUnits, positions, seg_in, step: LCKVStep, record: "_StepRecord",
                 passes: int | None, rows_of_step: torch.Tensor | None):
        if passes is None:
            passes = self.plan.prefill_passes(step.max_query_len)
        if passes > 1:
            # With one pass (a decode-only step) nothing reads a slot of this step before its producer writes it:
            # readers below the producer are strict, the producer writes before it reads.
            units.zero_slots(step)
        if units.split is not None and passes > 1 and self.tol > 0:
            # Without context (every sequence of the (sub-)step starts at position 0) the first pass's upward reads
            # see only the zeros just written: its body skips them.
            context_free = not bool(step.context_lens_cpu.any())
            out, used, last, rows = self._iterate_split(units, positions, seg_in, step, passes, context_free)
        else:
            out, used, last, rows = self._iterate(units, positions, seg_in, step, passes)
        record.add(units.seg, used, last, rows, rows_of_step)
        return out

    def _iterate(self, units: SegmentUnits, positions, seg_in, step: LCKVStep, passes: int):
        run = units.run
        B = step.num_reqs
        used = torch.ones(B, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.float64)
        q_lens = step.query_lens_cpu
        if passes <= 1:
            return run(positions, seg_in), used, last, q_lens.clone()
        if not self.settings.pass_economy:
            # every pass over every row, as the plain iterative encoding is written (LCKV_PASS_ECONOMY=0)
            out = None
            for _ in range(passes):
                out = run(positions, seg_in)
            return out, torch.minimum(q_lens, torch.full_like(used, passes)), last, q_lens * passes
        rows_run = q_lens.clone()  # per request: rows recomputed over all passes
        with units.capture() as capture:
            out = run(positions, seg_in)
        prev = _stack(capture)
        starts = torch.zeros(B, dtype=torch.long)
        for k in range(2, passes + 1):
            starts = starts.clamp_min(k - 1)  # after pass k-1 the first k-1 tokens are exact
            if self.tol == 0:
                part = pass_substep(step, k)  # the rows from k-1 on, shared by every segment of the step
                if part is None:
                    break
                reqs = (q_lens >= k).nonzero().flatten()
            else:
                reqs = (starts < q_lens).nonzero().flatten()
                if reqs.numel() == 0:
                    break
                part = substep(step, reqs, starts[reqs], q_lens[reqs] - starts[reqs])
            rows, sub = part
            with units.capture() as capture, self.substep_scope(sub):
                h = run(positions.index_select(0, rows), seg_in.index_select(0, rows))
            new = _stack(capture)
            out.index_copy_(0, rows, h)
            rows_run[reqs] += sub.query_lens_cpu
            if new is None or prev is None:  # a segment whose producers run elsewhere: nothing to measure
                used[reqs] = k
                continue
            change = row_change(new, prev.index_select(1, rows), self._tp_reduce).double().cpu()
            prev.index_copy_(1, rows, new)
            used[reqs] = k
            last[reqs], first = _per_request(change, sub, self.tol)
            if self.tol > 0:
                starts[reqs] = torch.where(first < _NONE, starts[reqs] + first, q_lens[reqs])
        return out, used, last, rows_run

    def _iterate_split(self, units: SegmentUnits, positions, seg_in, step: LCKVStep, passes: int,
                       context_free: bool):
        """Adaptive passes (the rule of `_iterate`) with the top producer split off: each pass runs `body` and
        `write_top` over the rows still iterating, measures, and then runs `tail` over the rows this pass made final
        (those before the next pass's first row; every row left after the last pass).  Same values as full passes:
        a final row's tail reads keys up to itself, all final."""
        u = units.split
        B = step.num_reqs
        used = torch.ones(B, dtype=torch.long)
        last = torch.zeros(B, dtype=torch.float64)
        q_lens = step.query_lens_cpu
        rows_run = torch.zeros(B, dtype=torch.long)
        out = torch.empty_like(seg_in)
        starts = torch.zeros(B, dtype=torch.long)
        reqs, cur, cur_rows, prev = torch.arange(B), step, None, None
        for k in range(1, passes + 1):
            pos = positions if cur_rows is None else positions.index_select(0, cur_rows)
            x_in = seg_in if cur_rows is None else seg_in.index_select(0, cur_rows)
            lens = cur.query_lens_cpu
            with self.substep_scope(cur) if cur is not step else contextlib.nullcontext():
                with units.capture() as capture:
                    hb = (u.body_first if k == 1 and context_free else u.body)(pos, x_in)
                    u.write_top(pos, hb)
                new = _stack(capture)
                rows_run[reqs] += lens
                used[reqs] = k
                old = starts[reqs]
                if prev is None:
                    prev, nxt = new, old + 1  # pass 1 makes the first row exact
                else:
                    change = row_change(new, prev.index_select(1, cur_rows), self._tp_reduce).double().cpu()
                    prev.index_copy_(1, cur_rows, new)
                    last[reqs], first = _per_request(change, cur, self.tol)
                    nxt = torch.where(first < _NONE, old + first, q_lens[reqs]).clamp_min(k)  # first k rows exact
                nxt = q_lens[reqs] if k == passes else torch.minimum(nxt, q_lens[reqs])
                done = (nxt > old).nonzero().flatten()  # indices into reqs (and cur's requests)
                if done.numel():
                    local, fin = substep(cur, done, torch.zeros_like(done), (nxt - old)[done])
                    with self.substep_scope(fin):
                        h = u.tail(pos.index_select(0, local), hb.index_select(0, local))
                    out.index_copy_(0, local if cur_rows is None else cur_rows.index_select(0, local), h)
            starts[reqs] = nxt
            reqs = (starts < q_lens).nonzero().flatten()
            if reqs.numel() == 0:
                break
            cur_rows, cur = substep(step, reqs, starts[reqs], q_lens[reqs] - starts[reqs])
        return out, used, last, rows_run

    # ---- telemetry -------------------------------------------------------------------------------------------------
    def finish_step(self, step: LCKVStep, record: "_StepRecord", reencoded: torch.Tensor | None = None) -> None:
        """Record the prefills of the step (requests with more than one token in it), except the requests in the
        boolean mask `reencoded` (generated tokens only, re-encoded one by one: recorded apart)."""
        if not record.touched:
            return
        q_lens = step.query_lens_cpu
        multi = q_lens > 1
        if reencoded is not None:
            self.stats.record_reencoded(q_lens[reencoded & multi].tolist())
            multi = multi & ~reencoded
        prefill = multi.nonzero().flatten()
        if prefill.numel() == 0:
            return
        cap = self.plan.num_passes
        passes = record.used[prefill]
        changes = record.last[prefill]
        long_ = q_lens[prefill] > cap
        # a prompt of at most m+b tokens is exact after its passes; a longer one that used all m+b passes and still
        # moved more than the tolerance has not converged
        bad = long_ & (passes >= cap) & (changes > self.yardstick)
        recomputed = float(record.rows[prefill].sum()) / max(1, len(record.segments))
        self.stats.record(passes.tolist(), q_lens[prefill].tolist(), changes.tolist(), int(bad.sum()), recomputed)
        if bool(bad.any()) and not self._warned:
            self._warned = True
            i = int(bad.nonzero()[0])
            logger.warning(
                "LCKV: this checkpoint's iterative prefill did not converge within m+b = %d passes (a %d-token "
                "prompt still moved its K/V by %.3g > %.3g in the last pass).  Outputs then depend on how prompts "
                "are split into steps (chunked prefill, prefix-cache hits).  For split-independent outputs serve "
                "with %s=0 (whole-prompt prefill, no prefix caching) and %s=0 (always m+b passes).  Trained "
                "checkpoints converge in a few passes; random-weight ones do not.",
                cap, int(q_lens[prefill][i]), float(changes[i]), self.yardstick, CHUNKED_PREFILL_ENV,
                PREFILL_TOL_ENV)


class _StepRecord:
    """Per-request passes used and last change over the cyclic segments of one step (max over segments and
    blocks), and rows recomputed (summed; `segments` counts the cyclic segments that ran)."""

    def __init__(self, num_reqs: int):
        self.used = torch.ones(num_reqs, dtype=torch.long)
        self.last = torch.zeros(num_reqs, dtype=torch.float64)
        self.rows = torch.zeros(num_reqs, dtype=torch.long)
        self.segments: set[int] = set()
        self.touched = False

    def add(self, seg, used, last, rows, rows_of_step: torch.Tensor | None) -> None:
        self.touched = True
        self.segments.add(id(seg))
        if rows_of_step is None:
            self.used = torch.maximum(self.used, used)
            self.last = torch.maximum(self.last, last)
            self.rows += rows
        else:
            self.used[rows_of_step] = torch.maximum(self.used[rows_of_step], used)
            self.last[rows_of_step] = torch.maximum(self.last[rows_of_step], last)
            self.rows.index_add_(0, rows_of_step, rows)


def _per_request(change: torch.Tensor, sub: LCKVStep, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request of `sub` (whose rows `change` measures): the largest change, and the index within its rows of the
    first row that moved more than `tol` (`_NONE` if none)."""
    lens = sub.query_lens_cpu
    n = len(lens)
    owner = torch.repeat_interleave(torch.arange(n), lens)  # row -> request
    largest = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, owner, change, "amax", include_self=False)
    offset = torch.arange(len(owner)) - torch.repeat_interleave(sub.query_start_loc_cpu[:-1], lens)
    idx = torch.where(change > tol, offset, torch.full_like(offset, _NONE))
    first = torch.full((n,), _NONE, dtype=torch.long).scatter_reduce(0, owner, idx, "amin", include_self=True)
    return largest, first


def _stack(capture: dict | None) -> torch.Tensor | None:
    """The captured K/V of a pass as `[producers, tokens, D]` (producers in the order they ran)."""
    if not capture:
        return None
    return torch.stack(list(capture.values()))
