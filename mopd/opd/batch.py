"""The record one on-policy step passes from seam to seam (ALGORITHMS §1-§5).

The loop draws prompts into a :class:`RolloutBatch`; shapers may give prompts a prefix before
sampling; the sampler fills in the rollouts and, through a scorer, the teachers' log-probs (or
top-k); a verifier may add outcome rewards; shapers may keep a subset of rows; :meth:`RolloutBatch.pack`
lays the kept rows out as tensors (:class:`PackedBatch`) that shapers may reshape (masks,
advantages) before the update reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mopd.rollout import Sample, pack
from mopd.teachers import SequenceScores, lay_out


@dataclass
class StepTiming:
    """Wall-clock seconds of one step's rollout phase (MOPD 3.3: teacher cost should hide
    behind sampling). ``teacher`` sums the scoring calls' own durations (they may overlap each
    other and the sampling); ``wait`` is the time the trainer blocked on them."""

    sample: float = 0.0
    teacher: float = 0.0
    wait: float = 0.0


@dataclass
class RolloutBatch:
    """One step's prompts and rollouts (lists, one entry per prompt or per rollout row).

    Per prompt: ``domains``, ``records``, ``prompt_ids``, ``prefixes`` (TrOPD teacher prefixes,
    None when no shaper sets them). Per row (rollout): ``samples``, ``scores`` (the teacher's
    log-probs, top-k when asked), ``prefix_lens``, ``rewards`` (outcome rewards, None when not
    verified). ``keep``: the rows the update trains on (all unless a shaper selects). ``seed``:
    the step's sampling seed, from which every shaper draws its own stream."""

    step: int
    seed: int
    domains: list[str]
    records: list[dict]
    prompt_ids: list[list[int]]
    prefixes: list[list[int]] | None = None
    samples: list[Sample] = field(default_factory=list)
    scores: list[SequenceScores] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    rewards: list[float] | None = None
    keep: list[int] | None = None
    all_scores: dict[str, list[SequenceScores]] | None = None  # every teacher's, when a shaper needs them
    timing: StepTiming = field(default_factory=StepTiming)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def row_domains(self) -> list[str]:
        return [self.domains[s.prompt_index] for s in self.samples]

    @property
    def groups(self) -> list[int]:
        """Each row's prompt group (its prompt's index)."""
        return [s.prompt_index for s in self.samples]

    @property
    def kept(self) -> list[int]:
        return list(range(len(self.samples))) if self.keep is None else self.keep

    def gather(self) -> None:
        """Data parallelism: every process's rows (samples, scores, prefix lengths, rewards, every
        teacher's scores) on every process, in the one-process order: each process sampled whole
        chunks of consecutive prompts, each prompt's rollouts together, so the rows ordered by
        prompt are the one-process rows. Then shapers act on the whole batch as in one process."""
        from mopd import runtime

        mine = [{"sample": [s.prompt_index, s.prompt_ids, s.completion_ids, s.text],
                 "prefix_len": self.prefix_lens[b], "score": _scores_json(self.scores[b]),
                 "reward": None if self.rewards is None else self.rewards[b],
                 "all": None if self.all_scores is None else {t: _scores_json(sc[b]) for t, sc in
                                                              self.all_scores.items()}}
                for b, s in enumerate(self.samples)]
        rows = sorted((r for part in runtime.all_gather_json(mine) for r in part), key=lambda r: r["sample"][0])
        self.samples = [Sample(*r["sample"]) for r in rows]
        self.prefix_lens = [r["prefix_len"] for r in rows]
        self.scores = [_scores_from_json(r["score"]) for r in rows]
        if self.rewards is not None:
            self.rewards = [r["reward"] for r in rows]
        if self.all_scores is not None:
            self.all_scores = {t: [_scores_from_json(r["all"][t]) for r in rows] for t in self.all_scores}

    def pack(self, pad_id: int, device, topk: int | None, prefix_mask: bool) -> "PackedBatch":
        """The kept rows as right-padded tensors on ``device``. ``prefix_mask``: split the
        response mask into the teacher's prefix tokens (``prefix_BT``) and the student's own."""
        kept = self.kept
        samples = [self.samples[b] for b in kept]
        ids_BT, attn_BT, mask_BT = pack(samples, pad_id, device=device)
        prefix_BT = None
        if prefix_mask:  # teacher tokens: β·NLL only; the on-policy terms see the student's
            prefix_BT = torch.zeros_like(mask_BT)
            for row, b in enumerate(kept):
                start = len(self.samples[b].prompt_ids)
                prefix_BT[row, start:start + self.prefix_lens[b]] = 1.0
            mask_BT = mask_BT - prefix_BT
        u_BT, top_ids_BTK, top_lp_BTK = (None if x is None else x.to(device) for x in lay_out(
            [self.scores[b] for b in kept], [len(s.prompt_ids) for s in samples], ids_BT.shape[1], topk))
        return PackedBatch(ids_BT, attn_BT, mask_BT, u_BT, top_ids_BTK, top_lp_BTK, prefix_BT,
                           rewards_B=None if self.rewards is None else [self.rewards[b] for b in kept],
                           groups_B=[self.samples[b].prompt_index for b in kept])


def _scores_json(sc: SequenceScores) -> dict:
    def plain(t):
        return None if t is None else {"data": t.reshape(-1).tolist(), "shape": list(t.shape),
                                   "dtype": str(t.dtype).removeprefix("torch.")}

    return {"logprobs": plain(sc.logprobs_C), "topk_ids": plain(sc.topk_ids_CK),
            "topk_logprobs": plain(sc.topk_logprobs_CK)}


def _scores_from_json(d: dict) -> SequenceScores:
    def tensor(x):
        return None if x is None else torch.tensor(x["data"], dtype=getattr(torch, x["dtype"])).reshape(x["shape"])

    return SequenceScores(tensor(d["logprobs"]), tensor(d["topk_ids"]), tensor(d["topk_logprobs"]))


@dataclass
class PackedBatch:
    """The kept rows laid out for the update: B rows × T positions (response positions marked by
    ``mask_BT``), K teacher top-k entries. ``old_logprobs_BT``: the rollout policy's log-probs
    (set when a shaper or several update passes need them); ``advantages_BT``: replaces ``u - s``
    in the policy-gradient losses when a shaper sets it (Uni-OPD calibration); ``weight_BT``:
    multiplies the K1 advantage ``clip(u - s)`` (Open-MOPD's domain and conflict weights), which
    ``refresh`` rebuilds from the student at every update pass."""

    ids_BT: torch.Tensor
    attn_BT: torch.Tensor
    mask_BT: torch.Tensor
    teacher_logprobs_BT: torch.Tensor
    teacher_topk_ids_BTK: torch.Tensor | None
    teacher_topk_logprobs_BTK: torch.Tensor | None
    prefix_BT: torch.Tensor | None
    rewards_B: list[float] | None
    groups_B: list[int]
    old_logprobs_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    weight_BT: torch.Tensor | None = None  # multiplies the K1 advantage (Open-MOPD shapers)
    refresh: bool = False  # rebuild the K1 advantage from the student at each update pass

    @property
    def rows(self) -> int:
        return self.ids_BT.shape[0]
