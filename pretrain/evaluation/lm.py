"""ebb's model as an lm-evaluation-harness `LM`: loglikelihood, loglikelihood_rolling and
generate_until on a `HybridLM` with the run's tokenizer, in-process, no export.

Requests are scored as lm-eval's `hf` model scores them (the same tokenization through
`TemplateLM`, left truncation to `max_length`, log-softmax over the model's whole vocabulary,
greedy = every continuation token the argmax), so the numbers equal that model's on the
`to-hf` export. What differs is how they are batched:
- requests with the same input tokens (a multiple-choice question's one-token answers, say) run
  once;
- the rest run longest first, `batch_size` rows a pass. Where packing saves at least
  `PACKING_GAIN` times the rows (requests much shorter than the longest), each row holds as many
  requests as fit in the longest one's length, as separate documents (`cu_seqlens`, so no state,
  conv tap or attention link crosses from one request into the next); otherwise each row holds
  one, right-padded as `hf` pads it (exact for a causal model, and the mixers' plain path, which
  is faster than the document-masked one), unless capacity routing (MoM's `capacity`) would let
  the padding compete with the request's tokens, where the padding is a document of its own;
- the head is applied only at the continuation tokens, not at every position.
Generation feeds rows of equal prompt length together through the model's decode cache.
"""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from models.model import HybridLM
from pretrain.data.tokenizer import Tokenizer
from pretrain.generate import sample_next

TokenRequest = tuple[Any, list[int], list[int]]  # (request strings, context tokens, continuation tokens)
PACKING_GAIN = 1.5  # pack rows when that takes this many times fewer rows than one request a row


@dataclass
class Scored:
    """One distinct model input and the requests scored from its outputs."""

    tokens: list[int]
    requests: list[tuple[int, list[int]]]  # (request index, continuation tokens)


class EbbLM(TemplateLM):
    """`model` (in eval mode, on `device`) under `autocast`, scored `batch_size` rows at a time."""

    def __init__(
        self,
        model: HybridLM,
        tokenizer: Tokenizer,
        device: torch.device,
        batch_size: int = 16,
        max_length: int = 2048,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        max_gen_toks: int = 256,
        progress: bool = True,
    ):
        super().__init__()
        self.model, self.ebb_tokenizer, self._device = model, tokenizer, torch.device(device)
        self.batch_size, self.max_length, self.max_gen_toks = batch_size, max_length, max_gen_toks
        self.autocast, self.progress = autocast, progress
        self.requests_scored = 0  # loglikelihood inputs run (after de-duplication), for the tests
        # padding after a request changes nothing it scores, except where tokens compete for a capacity
        self.padding_is_exact = not ("O" in model.cfg.blocks and model.cfg.mixers.mom.capacity)

    @property
    def eot_token_id(self) -> int:
        return self.ebb_tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.ebb_tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The run's tokenization, as training saw text (no special tokens: documents follow an eos,
        which is the loglikelihood prefix of an empty context)."""
        return self.ebb_tokenizer.encode(string)

    # --- loglikelihood ---------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: Sequence[TokenRequest], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        inputs: dict[tuple[int, ...], Scored] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored within max_length {self.max_length}")
            tokens = (context + continuation)[-(self.max_length + 1):][:-1]
            inputs.setdefault(tuple(tokens), Scored(tokens, [])).requests.append((index, continuation))
        longest_first = sorted(inputs.values(), key=lambda s: -len(s.tokens))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="ebb loglikelihood") as bar:
            for rows in batches(longest_first, self.batch_size):
                for index, answer in self._score_rows(rows):
                    results[index] = answer
                    bar.update(1)
        return results

    @torch.no_grad()
    def _score_rows(self, rows: list[list[Scored]]) -> list[tuple[int, tuple[float, bool]]]:
        """One forward pass over `rows` of packed inputs (padded with eos to the first row's
        length), the head applied at the continuations' positions only."""
        width = sum(len(s.tokens) for s in rows[0])
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        starts, positions, targets, owners = [0], [], [], []
        for r, row in enumerate(rows):
            offset = r * width
            for scored in row:
                n = len(scored.tokens)
                ids.view(-1)[offset:offset + n] = torch.tensor(scored.tokens)
                for index, continuation in scored.requests:
                    positions.append(torch.arange(offset + n - len(continuation), offset + n))
                    targets.append(torch.tensor(continuation))
                    owners.append(index)
                offset += n
                starts.append(offset)
            if offset < (r + 1) * width:
                starts.append((r + 1) * width)
        # rows of one request each are plain rows, padded at their ends (see the module docstring)
        plain = all(len(row) == 1 for row in rows) and (self.padding_is_exact or len(starts) == len(rows) + 1)
        cu_seqlens = None if plain else torch.tensor(sorted(set(starts)), dtype=torch.int32, device=self._device)
        with self.autocast():
            hidden, head = self.model(ids.to(self._device), cu_seqlens=cu_seqlens, head=lambda h, w: (h, w))
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = F.linear(flat[torch.cat(positions).to(self._device)], head)
        logprobs = F.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        answers, at = [], 0
        for index, target in zip(owners, targets):
            rows_of = logprobs[at:at + len(target)]
            target = target.to(self._device)
            greedy = bool((rows_of.argmax(dim=-1) == target).all())
            answers.append((index, (float(rows_of.gather(1, target[:, None]).sum()), greedy)))
            at += len(target)
        self.requests_scored += sum(len(row) for row in rows)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's whole loglikelihood in lm-eval's windows of `max_length` tokens (the first
        after the eos prefix, each later one with the most context that fits), all windows of all
        texts scored together."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window, get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)
            ):
                windows.append((None, context, continuation))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations until a stop string, eos or
        max_gen_toks; prompts of one token length and one set of options decode together."""
        eos = self.ebb_tokenizer.decode([self.eot_token_id]) or None
        groups: dict[tuple[str, int], list[tuple[int, list[int], dict]]] = {}
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            room = self.max_length - kwargs["max_gen_toks"]
            if room <= 0:
                raise ValueError(f"max_gen_toks {kwargs['max_gen_toks']} leaves no room for a prompt within max_length {self.max_length}")
            tokens = self.tok_encode(context)[-room:] or [self.prefix_token_id]
            groups.setdefault((repr(sorted(kwargs.items())), len(tokens)), []).append((index, tokens, kwargs))
        results = [""] * len(requests)
        with tqdm(total=len(requests), disable=disable_tqdm or not self.progress, desc="ebb generate_until") as bar:
            for group in groups.values():
                for start in range(0, len(group), self.batch_size):
                    batch = group[start:start + self.batch_size]
                    kwargs = dict(batch[0][2])
                    until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                    for (index, _, _), text in zip(batch, self._generate([tokens for _, tokens, _ in batch], until, kwargs)):
                        results[index] = postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", requests[index].args, results[index])
                        bar.update(1)
        return results

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], until: list[str], kwargs: dict) -> list[str]:
        """Decode `prompts` (one length) together; each row's text, stopped where it stops."""
        tok, steps = self.ebb_tokenizer, kwargs["max_gen_toks"]
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        generator = torch.Generator(self._device).manual_seed(int(kwargs.get("seed", 0)))
        cache = self.model.new_cache()
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with self.autocast():
            logits = self.model(torch.tensor(prompts, device=self._device), cache=cache)[:, -1]
            for _ in range(steps):
                step = [sample_next(row[: tok.vocab_size], temperature, kwargs.get("top_k"), generator) for row in logits]
                for r, token in enumerate(step):
                    if done[r]:
                        continue
                    if token == self.eot_token_id:
                        done[r] = True
                        continue
                    new[r].append(token)
                    done[r] = any(stop and stop in tok.decode(new[r]) for stop in until)
                if all(done):
                    break
                logits = self.model(torch.tensor(step, device=self._device)[:, None], cache=cache)[:, -1]
        return [tok.decode(tokens) for tokens in new]


def batches(longest_first: list[Scored], batch_size: int) -> Iterator[list[list[Scored]]]:
    """The forward passes' rows: packed (`pack_rows`) where that takes `PACKING_GAIN` times fewer
    rows than one input a row, else one input a row, `batch_size` rows a pass."""
    packed = len(pack_rows(deque(longest_first), len(longest_first)))
    if len(longest_first) >= PACKING_GAIN * packed:
        pending = deque(longest_first)
        while pending:
            yield pack_rows(pending, batch_size)
    else:
        for start in range(0, len(longest_first), batch_size):
            yield [[scored] for scored in longest_first[start:start + batch_size]]


def pack_rows(pending: deque[Scored], batch_size: int) -> list[list[Scored]]:
    """Up to `batch_size` rows as long as the longest pending input, taken from `pending` (longest
    first): each row starts with the next longest input and is topped up with the longest that
    still fit, then the shortest."""
    width = len(pending[0].tokens)
    rows = []
    while pending and len(rows) < batch_size:
        row = [pending.popleft()]
        room = width - len(row[0].tokens)
        for take in (deque.popleft, deque.pop):
            end = 0 if take is deque.popleft else -1
            while pending and len(pending[end].tokens) <= room:
                row.append(take(pending))
                room -= len(row[-1].tokens)
        rows.append(row)
    return rows

