"""Fill-mask, the model side: the request schema, checks, batched forward and HF-pipeline scores.

`model` is an HF directory written by `serving.export` (or any HF RoBERTa MLM directory with our
tokenizer files) or a training checkpoint (a `step_*` directory, the `latest` pointer, a `checkpoints/`
directory or a run directory). With `serve=true` the same schema is served over HTTP (see
`serving.server`: `POST /score`, `GET /health`, concurrent requests batched into one forward).

Request (the model card's real-time endpoint schema), from a file or stdin (`request=-`):

    {"inputs": {"input_string": ["Paris is the <mask> of France.", "Today is a <mask> day!"]},
     "parameters": {"top_k": 2}}

`parameters` and `top_k` are optional (default: the `top_k` argument, 5 as in HF's pipeline).
Response (stdout, JSON): one list per input string, best first, of `top_k` objects

    {"score": 0.41, "token": 3001, "token_str": " capital", "sequence": "Paris is the capital of France."}

as HF's `pipeline("fill-mask")` computes them: `score` is the softmax over the whole vocabulary at the
mask position (nothing excluded, special tokens included), `token_str` the token decoded alone (with
its leading space), `sequence` the input's ids with the mask replaced, decoded without special tokens.

Each string must hold exactly one `<mask>`: a string with none or several is a bad request (HF's
pipeline would give one list per mask, changing the response's shape; we keep one list per string).
Other bad requests: not JSON, not an object, unknown keys, `input_string` not a non-empty list of
strings, `top_k` not an integer in [1, vocab_size], a string longer than the model's positions allow
(`max_positions - 2` tokens with `<s>` and `</s>`). The CLI exits 1 with `error: <why>` on stderr;
the server answers 400 with `{"error": "<why>"}` and goes on serving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tokenizers import Tokenizer

from core.checkpoint import load_model_and_tokenizer
from core.model import RobertaForMaskedLM
from core.tokenizer import MASK, TokenizerError, special_ids

DEFAULT_TOP_K = 5
"""Candidates per string when the request names no `top_k` (HF's pipeline default)."""


class RequestError(ValueError):
    """A request that does not fit the schema or the model; the message says why (HTTP 400)."""


@dataclass(frozen=True)
class FillMaskRequest:
    """A parsed request: the strings and the number of candidates for each."""

    strings: list[str]
    top_k: int


@dataclass(frozen=True)
class Encoded:
    """One input string as the model sees it."""

    ids: list[int]
    """Token ids with `<s>` and `</s>`."""
    mask_index: int
    """Position of the one `<mask>` in `ids`."""


# The request and response schema, typed: `parse_request` validates with it, and the server's
# /openapi.json describes it.

class FillMaskInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    input_string: List[str] = Field(min_length=1, description="Strings, each with exactly one <mask>.")


class FillMaskParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    top_k: Optional[int] = Field(None, description="Candidates per string, in [1, vocab_size] (default 5).",
                                 json_schema_extra={"minimum": 1})


class FillMaskBody(BaseModel):
    """A fill-mask request: the model card's real-time endpoint schema."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"inputs": {"input_string": [
                                  "Paris is the <mask> of France."]}, "parameters": {"top_k": 2}}]})
    inputs: FillMaskInputs
    parameters: Optional[FillMaskParameters] = None


class Candidate(BaseModel):
    """One answer for one string, as HF's pipeline("fill-mask") gives it."""

    score: float = Field(description="Softmax over the whole vocabulary at the mask position.")
    token: int = Field(description="The candidate's id.")
    token_str: str = Field(description="The candidate decoded alone (with its leading space).")
    sequence: str = Field(description="The input with the mask replaced, decoded without special tokens.")


FillMaskResponse = List[List[Candidate]]
"""One list per input string, best first."""


def _why(error: dict[str, Any]) -> str:
    """One pydantic error as the message a client reads (naming the key, as the CLI's errors do)."""
    loc, kind, got = tuple(error["loc"]), error["type"], error.get("input")
    if loc == ():
        return f"the request must be a JSON object, got {type(got).__name__}"
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unknown request key(s) {[loc[0]]}; known: {sorted(FillMaskBody.model_fields)}"
    if kind == "extra_forbidden" and loc[0] == "parameters":
        return f"unknown parameter(s) {[loc[-1]]}; known: {sorted(FillMaskParameters.model_fields)}"
    if loc[0] == "inputs" and (len(loc) == 1 or kind in ("extra_forbidden", "missing")):
        return '"inputs" must be an object with exactly one key, "input_string"'
    if loc[:2] == ("inputs", "input_string"):
        if kind == "too_short":
            return '"inputs.input_string" is empty: give at least one string'
        return '"inputs.input_string" must be a list of strings'
    if loc == ("parameters",):
        return f'"parameters" must be an object, got {type(got).__name__}'
    if loc == ("parameters", "top_k"):
        return f'"parameters.top_k" must be an integer, got {got!r}'
    return f"{'.'.join(map(str, loc))}: {error['msg']}"


def parse_request(obj: Any, default_top_k: int = DEFAULT_TOP_K) -> FillMaskRequest:
    """Check a decoded JSON request against the schema (`FillMaskBody`: types, keys, a non-empty list
    of strings, an integer `top_k`); the range of `top_k` and the strings themselves are checked by
    `FillMasker`."""
    try:
        body = FillMaskBody.model_validate(obj)
    except ValidationError as e:
        raise RequestError(_why(e.errors()[0])) from None
    for i, text in enumerate(body.inputs.input_string):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"input_string[{i}] is not valid Unicode (a lone surrogate such as \\ud800)") from None
    top_k = body.parameters.top_k if body.parameters and body.parameters.top_k is not None else default_top_k
    return FillMaskRequest(strings=body.inputs.input_string, top_k=top_k)


def decode_request(body: bytes | str, default_top_k: int = DEFAULT_TOP_K) -> FillMaskRequest:
    """`parse_request` of raw JSON text; malformed JSON is a `RequestError`."""
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    return parse_request(obj, default_top_k)


class FillMasker:
    """A model and its tokenizer, answering fill-mask requests with one padded forward per batch.

    `encode` and `check_top_k` validate (raising `RequestError`); `predict` runs the model. `predict` is
    not thread-safe: the server calls it from one worker thread.
    """

    def __init__(self, model: RobertaForMaskedLM, tokenizer: Tokenizer, device: torch.device | str = "cpu",
                 max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        ids = special_ids(tokenizer)
        if tokenizer.get_vocab_size() != model.config.vocab_size:
            raise TokenizerError(f"the tokenizer has {tokenizer.get_vocab_size()} ids, the model "
                                 f"vocab_size={model.config.vocab_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.mask_id, self.pad_id = ids["mask"], model.config.pad_token_id
        self.vocab_size = model.config.vocab_size
        self.max_tokens = model.config.max_seq_len
        self.max_batch = max_batch

    def check_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.vocab_size:
            raise RequestError(f'"parameters.top_k"={top_k} is out of range [1, {self.vocab_size}] '
                               f'(the vocabulary)')

    def encode(self, strings: Sequence[str]) -> list[Encoded]:
        """Tokenize (with `<s>`/`</s>`) and check each string: exactly one `<mask>`, not too long."""
        out = []
        for i, (text, enc) in enumerate(zip(strings, self.tokenizer.encode_batch(list(strings)))):
            where = [j for j, t in enumerate(enc.ids) if t == self.mask_id]
            if len(where) != 1:
                raise RequestError(f"input_string[{i}] has {len(where)} {MASK} tokens; each string needs "
                                   f"exactly one: {text[:80]!r}")
            if len(enc.ids) > self.max_tokens:
                raise RequestError(f"input_string[{i}] is {len(enc.ids)} tokens with <s> and </s>; the model "
                                   f"takes at most {self.max_tokens}")
            out.append(Encoded(ids=list(enc.ids), mask_index=where[0]))
        return out

    @torch.no_grad()
    def predict(self, encoded: Sequence[Encoded], top_ks: Sequence[int]) -> list[list[dict[str, Any]]]:
        """The top-k candidates of each encoded string, forwards of up to `max_batch` right-padded rows."""
        results: list[list[dict[str, Any]]] = []
        for start in range(0, len(encoded), self.max_batch):
            chunk = encoded[start : start + self.max_batch]
            longest = max(len(e.ids) for e in chunk)
            input_ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, e in enumerate(chunk):
                input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
                attention[row, : len(e.ids)] = 1
            logits = self.model(input_ids.to(self.device), attention.to(self.device)).logits  # [B, S, V]
            rows = torch.arange(len(chunk), device=self.device)
            masks = torch.tensor([e.mask_index for e in chunk], device=self.device)
            probs = logits[rows, masks].float().softmax(dim=-1).cpu()  # [B, V]
            for row, e in enumerate(chunk):
                values, tokens = probs[row].topk(top_ks[start + row])
                results.append([self._candidate(e, score, token)
                                 for score, token in zip(values.tolist(), tokens.tolist())])
        return results

    def _candidate(self, e: Encoded, score: float, token: int) -> dict[str, Any]:
        filled = list(e.ids)
        filled[e.mask_index] = token
        return {"score": score, "token": token,
                "token_str": self.tokenizer.decode([token], skip_special_tokens=False),
                "sequence": self.tokenizer.decode(filled, skip_special_tokens=True)}

    def __call__(self, request: FillMaskRequest) -> list[list[dict[str, Any]]]:
        """Answer a whole request in this thread (the CLI)."""
        self.check_top_k(request.top_k)
        encoded = self.encode(request.strings)
        return self.predict(encoded, [request.top_k] * len(encoded))


def load_fill_masker(model: str | Path, tokenizer: str | Path | None = None, device: str = "cpu",
                     max_batch: int = 64, verify: bool = True) -> FillMasker:
    """A `FillMasker` of an HF directory or a checkpoint (see `core.checkpoint.load_model_and_tokenizer`)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net, tok = load_model_and_tokenizer(model, tokenizer, verify)
    return FillMasker(net, tok, device, max_batch)
