"""load_bundle() and LanguageModel: what apps call to generate text from a bundle (an encoder
bundle opens as an EncoderModel, edgelm_runtime.encoder).

LanguageModel joins the pieces (decoder session, tokenizer, chat template, sampler, stop
strings) and checks each request up front, so a bad request fails when it is made, not at the
first token of a stream. Options left as None take the manifest's generation defaults."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from edgelm_runtime.adapters import BundleAdapters, adapter_decoder
from edgelm_runtime.batch import BatchDecoder
from edgelm_runtime.bundle import MANIFEST_FILE, Manifest, resolve_inside, verify_bundle
from edgelm_runtime.constrained import GrammarTokenizer, TokenConstraint, grammar_spec
from edgelm_runtime.encoder import EncoderModel, open_encoder, wrong_task
from edgelm_runtime.errors import BundleError, GenerationError, TemplateError
from edgelm_runtime.generate import GenerationStats, StopFilter, decode_tokens
from edgelm_runtime.history import fit_messages
from edgelm_runtime.kv_reuse import DEFAULT_BUDGET_MB, PrefixCache
from edgelm_runtime.prompt_tasks import PromptTasks
from edgelm_runtime.prompts import PromptTemplate, read_prompts
from edgelm_runtime.sampling import Sampler, SamplingParams
from edgelm_runtime.scoring import continuation_logprobs
from edgelm_runtime.session import DecoderSession, open_decoder
from edgelm_runtime.static import StaticDecoderSession
from edgelm_runtime.templates import ChatTemplate
from edgelm_runtime.tokenizer import BundleTokenizer

logger = logging.getLogger(__name__)
Messages = list[dict[str, Any]]


def load_bundle(path: str | Path, verify: bool = False, threads: int | None = None,
                provider: str | None = None, manifest: Manifest | None = None,
                kv_cache_mb: float = DEFAULT_BUDGET_MB) -> LanguageModel | EncoderModel:
    """Open a bundle folder: a LanguageModel for a text-generation bundle, an EncoderModel for an
    encoder bundle (manifest `encoder`: embed(), classify() or tag(), as its task says).
    File sizes are always checked; verify=True also checks every sha256.
    `threads` overrides the manifest's intra-op thread count (0 = onnxruntime's default);
    `provider` the manifest's execution provider (e.g. run a GPU bundle on the CPU to check it).
    `manifest`: open the folder with this manifest instead of its manifest.json (edgelm build
    checks a bundle's quality before it writes the manifest, once).
    `kv_cache_mb`: the KV caches of recent runs kept for prompts that start the same way
    (kv_reuse.PrefixCache: a chat's next turn, the next few-shot classify call); 0 turns it off."""
    folder = Path(path)
    manifest = verify_bundle(folder, manifest=manifest, check_hashes=verify)
    tokenizer = BundleTokenizer.from_file(resolve_inside(folder, manifest.tokenizer_file, "tokenizer_file"))
    if tokenizer.vocab_size > manifest.vocab_size:
        raise BundleError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                          f"{manifest.vocab_size}", hint="the tokenizer belongs to another model; rebuild the bundle")
    if manifest.encoder is not None:  # before the decoder's chat template, prompts and sampling defaults
        return open_encoder(folder, manifest, tokenizer, threads, provider)
    if manifest.chat_template_file is None:
        logger.info("%s has no chat template; chat uses the built-in ChatML template", folder)
        template = ChatTemplate.fallback(manifest.bos_token, manifest.eos_token)
    else:
        template = ChatTemplate.from_file(resolve_inside(folder, manifest.chat_template_file, "chat_template_file"),
                                          manifest.bos_token, manifest.eos_token)
    prompts = {}
    if manifest.prompt_templates_file is not None:
        prompts = read_prompts(resolve_inside(folder, manifest.prompt_templates_file, "prompt_templates_file"))
    decode_path = None if manifest.static is None else \
        resolve_inside(folder, manifest.static.decode_model_file, "static.decode_model_file")
    decoder = open_decoder(resolve_inside(folder, manifest.model_file, "model_file"), manifest, threads, provider,
                           decode_path)
    llm = LanguageModel(folder, manifest, decoder, tokenizer, template, prompts,
                        PrefixCache.for_decoder(decoder, kv_cache_mb, manifest.max_seq_len))
    try:
        llm.sampling_params()  # the manifest's generation defaults must be valid sampling settings
    except GenerationError as exc:
        raise BundleError(f"{folder / MANIFEST_FILE}: generation defaults: {exc.message}",
                          hint="fix the manifest's generation section, or rebuild the bundle") from None
    return llm


class LanguageModel(PromptTasks):
    """A loaded bundle. Not thread-safe: serve one request at a time per instance."""

    def __init__(self, path: Path, manifest: Manifest, decoder: DecoderSession, tokenizer: BundleTokenizer,
                 chat_template: ChatTemplate, prompts: dict[str, PromptTemplate] | None = None,
                 cache: PrefixCache | None = None) -> None:
        self._prompts = dict(prompts or {})
        self.kv_cache = cache
        self._batch: BatchDecoder | None = None
        self._path = path
        self._manifest = manifest
        self._decoder = decoder
        self._tokenizer = tokenizer
        self._chat_template = chat_template
        self.last_stats: GenerationStats | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None  # built on the first constrained generation
        # runtime LoRA adapters (edgelm_runtime.adapters): with_adapter(name) views share this session
        self.adapter: str | None = None
        self._adapters, self._base = BundleAdapters(path, manifest), self

    @property
    def adapters(self) -> list[str]:
        """The names of the bundle's runtime LoRA adapters (manifest `runtime_adapters`)."""
        return self._adapters.names

    def with_adapter(self, name: str | None) -> LanguageModel:
        """This bundle with the runtime adapter `name` active (None: the base model): a view sharing
        the session, tokenizer and templates, made once per name (adapters.BundleAdapters.view)."""
        return self._base if name is None else self._adapters.view(name, self._base._decoder, self._base._adapter_view)

    def _adapter_view(self, name: str, decoder: DecoderSession) -> LanguageModel:
        view = LanguageModel(self._path, self._manifest, decoder, self._tokenizer, self._chat_template, self._prompts,
                             self.kv_cache)  # one prefix cache: runs of different adapters never match
        view.adapter, view._adapters, view._base = name, self._adapters, self
        return view

    def _view(self, adapter: str | None) -> LanguageModel:
        return self if adapter is None else self.with_adapter(adapter)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def decoder(self) -> DecoderSession | StaticDecoderSession:
        """The onnxruntime session: `run` for whole batches, `stepper` for one fast sequence."""
        return self._decoder

    @property
    def chat_template_source(self) -> str:
        return self._chat_template.source

    @property
    def tokenizer(self) -> BundleTokenizer:
        return self._tokenizer

    def sampling_params(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float | None = None, seed: int | None = None,
                        presence_penalty: float | None = None, frequency_penalty: float | None = None) -> SamplingParams:
        """SamplingParams with the manifest's defaults for every option left as None."""
        defaults = self._manifest.generation
        return SamplingParams(
            temperature=defaults.temperature if temperature is None else temperature,
            top_k=defaults.top_k if top_k is None else top_k,
            top_p=defaults.top_p if top_p is None else top_p,
            repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else repetition_penalty,
            seed=seed, presence_penalty=presence_penalty or 0.0, frequency_penalty=frequency_penalty or 0.0,
            prompt_lookup=defaults.prompt_lookup)

    def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None, adapter: str | None = None,
                 **constraint: Any) -> str:
        """The text after `prompt`. `constraint`: at most one of json_schema=, regex=, choices=,
        grammar= (constrained.grammar_spec), which the output then follows token by token.
        `adapter`: a runtime LoRA adapter's name (`adapters`) for this call (as with_adapter)."""
        return "".join(self.generate_stream(prompt, max_new_tokens, temperature, top_k, top_p,
                                            repetition_penalty, seed, stop, adapter=adapter, **constraint))

    def generate_stream(self, prompt: str, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None,
                        repetition_penalty: float | None = None, seed: int | None = None,
                        stop: list[str] | None = None, adapter: str | None = None, **constraint: Any) -> Iterator[str]:
        model = self._view(adapter)  # an unknown adapter fails here, before any work
        matcher = self.constraint(**constraint)  # before any work: a bad schema generates nothing
        ids = self._tokenizer.encode(prompt, add_special_tokens=True)
        sampling = self.sampling_params(temperature, top_k, top_p, repetition_penalty, seed)
        return model._stream_text(ids, max_new_tokens, sampling, stop, matcher)

    def chat(self, messages: Messages, max_new_tokens: int | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, stop: list[str] | None = None, adapter: str | None = None,
             **constraint: Any) -> str:
        """The assistant's reply to `messages` (constraint and adapter as in generate())."""
        return "".join(self.chat_stream(messages, max_new_tokens, temperature, top_k, top_p,
                                        repetition_penalty, seed, stop, adapter=adapter, **constraint))

    def chat_stream(self, messages: Messages, max_new_tokens: int | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                    seed: int | None = None, stop: list[str] | None = None, adapter: str | None = None,
                    **constraint: Any) -> Iterator[str]:
        model = self._view(adapter)
        matcher = self.constraint(**constraint)
        sampling = self.sampling_params(temperature, top_k, top_p, repetition_penalty, seed)
        ids = self.chat_prompt_ids(messages, max_new_tokens)
        return model._stream_text(ids, max_new_tokens, sampling, stop, matcher)

    def constraint(self, json_schema: Any = None, regex: str | None = None, choices: Sequence[str] | None = None,
                   grammar: str | None = None) -> TokenConstraint | None:
        """A fresh matcher for one generation (None without a constraint); a schema or grammar
        that does not compile is a GenerationError here, before anything is generated."""
        given = grammar_spec(json_schema, regex, choices, grammar)
        if given is None:
            return None
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self._tokenizer.to_json(), self._manifest.vocab_size,
                                                       self._manifest.eos_token_ids)
        return self._grammar_tokenizer.constraint(*given)

    def fit_history(self, messages: Messages, max_new_tokens: int | None = None) -> Messages:
        """The conversation trimmed so its prompt leaves room for the answer (`max_new_tokens`, at
        most a quarter of the context: a longer answer still runs, up to the context's end): oldest
        turns go first, a leading system message always stays, and the kept part starts with a
        user turn. The last message alone not fitting is a GenerationError."""
        return self._fit(messages, max_new_tokens)[0]

    def chat_prompt_ids(self, messages: Messages, max_new_tokens: int | None = None,
                        deadline: float | None = None, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the chat prompt for `messages`, trimmed as `fit_history` trims them.
        `deadline` (a time.monotonic() value): past it, trimming stops with PromptDeadlineError.
        `tools` (OpenAI function definitions) go to the chat template's `tools` variable."""
        return self._fit(messages, max_new_tokens, deadline, tools)[1]

    def _fit(self, messages: Messages, max_new_tokens: int | None, deadline: float | None = None,
             tools: list[dict[str, Any]] | None = None) -> tuple[Messages, list[int]]:
        room = min(max_new_tokens or self._manifest.generation.max_new_tokens, self._manifest.max_seq_len // 4)
        return fit_messages(lambda kept: self._chat_ids(kept, tools), messages, self._manifest.max_seq_len, room,
                            deadline)

    def _chat_ids(self, messages: Messages, tools: list[dict[str, Any]] | None = None) -> list[int]:
        # the template writes the special tokens (bos, role markers) itself
        return self._tokenizer.encode(self.render_chat(messages, tools=tools), add_special_tokens=False)

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        return self._chat_template.render(messages, add_generation_prompt, tools=tools)

    def generate_tokens(self, input_ids: Sequence[int], max_new_tokens: int | None = None,
                        sampling: SamplingParams | None = None, constraint: TokenConstraint | None = None,
                        observe: Callable[[np.ndarray, int], None] | None = None,
                        report: Callable[[GenerationStats], None] | None = None) -> Iterator[int]:
        """New token ids after `input_ids` (eos not included); sets `last_stats` when done, or
        calls `report` with them instead (concurrent callers: each gets its own).
        `constraint` (from constraint()) and `observe` as in generate.decode_tokens."""
        ids = self._check_prompt(input_ids, limit=self._manifest.max_seq_len - 1)
        if max_new_tokens is None:
            max_new_tokens = self._manifest.generation.max_new_tokens
        _check_max_new_tokens(max_new_tokens)
        self.last_stats = None
        return decode_tokens(self._decoder, ids, max_new_tokens, Sampler(sampling or self.sampling_params()),
                             self._manifest.eos_token_ids, self._manifest.max_seq_len, report or self._record_stats,
                             constraint, observe, cache=self._base._batch or self.kv_cache)

    def enable_batching(self, slots: int) -> BatchDecoder:
        """Let up to `slots` generations from concurrent threads share each decode step
        (batch.BatchDecoder; what `edgelm serve --parallel N` does). Returns the engine."""
        self._batch = BatchDecoder(self._decoder, slots, self._manifest.max_seq_len, self.kv_cache)
        return self._batch

    def logits(self, input_ids: Sequence[int], adapter: str | None = None) -> np.ndarray:
        """Logits (S, V) float32 at every position of `input_ids`, from one prefill run."""
        ids = self._check_prompt(input_ids, limit=self._manifest.max_seq_len)
        logits, _ = self._view(adapter)._decoder.run(np.asarray([ids], dtype=np.int64), None)
        return logits[0]

    def continuation_logprobs(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token log-probabilities of each continuation after the prompt (the prompt runs once)."""
        longest = max((len(c) for c in continuations), default=0)
        if longest == 0 or any(len(c) == 0 for c in continuations):
            raise GenerationError("every continuation needs at least one token", hint="pass non-empty continuations")
        ids = self._check_prompt(input_ids=prompt_ids, limit=self._manifest.max_seq_len - longest)
        for tokens in continuations:
            self._check_prompt(tokens, limit=longest)
        return continuation_logprobs(self._decoder, ids, continuations, self.kv_cache)

    def embed(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, "text-generation", "embed()", "feature-extraction")

    def tag(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, "text-generation", "tag()", "token-classification")

    def _record_stats(self, stats: GenerationStats) -> None:
        self.last_stats = stats

    def _check_prompt(self, input_ids: Sequence[int], limit: int) -> list[int]:
        ids = [int(i) for i in input_ids]
        if not ids:
            raise GenerationError("the prompt is empty (0 tokens)", hint="pass at least one token of text")
        if len(ids) > limit:
            raise GenerationError(f"prompt is {len(ids)} tokens; the context is {self._manifest.max_seq_len}",
                                  hint=f"shorten the prompt to at most {limit} tokens")
        bad = [i for i in ids if not 0 <= i < self._manifest.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary (0..{self._manifest.vocab_size - 1})",
                                  hint="encode text with this bundle's tokenizer")
        return ids

    def stream_ids(self, ids: list[int], max_new_tokens: int | None, sampling: SamplingParams,
                   stop: list[str] | None = None, constraint: TokenConstraint | None = None,
                   observe: Callable[[np.ndarray, int], None] | None = None,
                   report: Callable[[GenerationStats], None] | None = None) -> Iterator[str]:
        """Text pieces generated after the token ids `ids` (for servers that tokenize themselves)."""
        return self._stream_text(list(ids), max_new_tokens, sampling, stop, constraint, observe, report)

    def check_request(self, ids: Sequence[int], max_new_tokens: int | None, stop: list[str] | None) -> None:
        """Raise now what generation would raise at its start: prompt length, max_new_tokens, stop."""
        StopFilter(stop)
        self._check_prompt(ids, limit=self._manifest.max_seq_len - 1)
        if max_new_tokens is not None:
            _check_max_new_tokens(max_new_tokens)

    def _stream_text(self, ids: list[int], max_new_tokens: int | None, sampling: SamplingParams,
                     stop: list[str] | None, constraint: TokenConstraint | None = None,
                     observe: Callable[[np.ndarray, int], None] | None = None,
                     report: Callable[[GenerationStats], None] | None = None) -> Iterator[str]:
        stops = StopFilter(stop)  # checked now: a bad request fails before the stream starts
        tokens = self.generate_tokens(ids, max_new_tokens, sampling, constraint, observe, report)
        return self._text_pieces(tokens, stops)

    def _text_pieces(self, tokens: Iterator[int], stops: StopFilter) -> Iterator[str]:
        detokenizer = self._tokenizer.incremental_decoder()
        with closing(tokens):  # stopping early still ends the loop and records last_stats
            for token in tokens:
                piece = stops.push(detokenizer.push(token))
                if stops.stopped:
                    tokens.close()  # no more model runs, even if the caller never asks again
                if piece:
                    yield piece
                if stops.stopped:
                    return
            tail = stops.push(detokenizer.flush()) + stops.flush()
            if tail:
                yield tail


def _check_max_new_tokens(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise GenerationError(f"max_new_tokens is {value!r}; it must be a whole number > 0",
                              hint="pass max_new_tokens=64, say")
