"""The lmms-eval model `p2r`: answers lmms-eval requests with the P2R pipeline in one of its three modes.

    lmms-eval --model p2r --model_args pretrained=Qwen/Qwen3-VL-4B-Instruct,mode=p2r --tasks vstar,hrbench

Requests are batched with lmms-eval's `utils.Collator` (grouped by generation kwargs) and
each batch runs through `Pipeline`. A task's `doc_to_text` is the question. Our tasks
declare their answer form (`p2r_answer_form` in their model-specific generation kwargs)
and get the whole record back in an envelope (see `envelope`). Any other lmms-eval task
gets the answer text alone (inside <answer> tags in reasoning modes, the whole output when
there are none, "" for a failed sample), its answer form guessed from the question: option
lines "A." / "(A)" / "A)" make it mca, otherwise free_form. `--use_cache` works as for
any lmms-eval model, but 0.7.3 caches replies only once `generate_until` has returned
(its `cache_hook` is a no-op), so a killed run keeps nothing. `record_cache=PATH` keeps
every finished record in a journal as its batch completes: a re-run after a crash or a
kill answers those from the journal and computes only the rest.

Several processes: under `accelerate launch --num_processes N -m lmms_eval --model p2r ...`
lmms-eval gives each process every N-th request of each task and gathers the replies on rank
0, which scores them, so the results equal one process's. Each process takes its rank and
world size from accelerate and its own device: the hf backend loads the model on
cuda:{local_rank} (the CPU under accelerate's CPU/gloo path), the vllm backend builds one
engine per process on its own `tensor_parallel_size` GPUs, and with `record_cache=PATH`
each rank keeps its own journal, PATH.rank{R}of{N}.

Mixed roles: `perceiver_pretrained`, `perceiver_backend`, `perceiver_base_url` or
`perceiver_served_model` give p2r mode's perceive pass its own engine; the other arguments
then name the reasoner. Omitted, one engine plays both roles and sends exactly the requests
it always did. Each record's envelope names the model and backend of each pass
(`passes`); lmms-eval's results JSON keeps the model args, which name both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from ..access import key_from_env
from ..client import RequestRejected, ServiceUnavailable
from ..engines import Engine, is_toy, make_engine, resolve_backend
from ..images import PixelBudget, check_image_mode
from ..pipeline import RELEASE_DECODING, RELEASE_MAX_NEW_TOKENS, Pipeline
from ..prompts import MODES
from ..records import Journal, Record, Sample
from . import envelope, registration
from .roles import API_KEY_ENV, PERCEIVER, PERCEIVER_API_KEY_ENV, RoleEngine, decoding, describe
from .roles import perceiver_engine_args

ANSWER_FORM_KEY = "p2r_answer_form"
# Option lines of a multiple-choice question: "A. red", "(B) blue", "C) green".
_OPTION = re.compile(r"^\s*\(?([A-F])(?:\)|\.|\s)", re.MULTILINE)


def placement(accelerator: Accelerator) -> tuple[int, int, int]:
    """(rank, world size, local rank) of this process, as lmms-eval splits the requests.

    torch.distributed's view wins: on a machine without GPUs `accelerate launch --multi_gpu`
    starts the processes and a gloo group, yet its Accelerator reports one process.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", accelerator.local_process_index))
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), local
    return accelerator.process_index, accelerator.num_processes, accelerator.local_process_index


def gpu_slice(local_rank: int, per_process: int, visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES of one process's vLLM engine: its own `per_process` GPUs of those visible."""
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mine = devices[local_rank * per_process : (local_rank + 1) * per_process]
    if len(mine) < per_process:
        raise ValueError(
            f"p2r: process {local_rank} needs GPUs {local_rank * per_process}..{(local_rank + 1) * per_process - 1} "
            f"(tensor_parallel_size {per_process} each), only {len(devices)} visible on this node"
        )
    return ",".join(mine)


def guess_answer_form(question: str) -> tuple[str, str]:
    """(answer form, option letters) of another task's question: mca when it lists options A, B, ..."""
    letters = "".join(sorted(set(_OPTION.findall(question))))
    if letters.startswith("AB"):
        return "mca", letters
    return "free_form", "ABCD"


class P2R(lmms):
    """One VLM in default, thinking or p2r mode, on the hf, vllm or openai backend.

    Decoding is the model's, never the task's: by default the release's settings
    (pipeline.RELEASE_DECODING and RELEASE_MAX_NEW_TOKENS). `max_new_tokens` is the answering
    pass's budget (default 16 / 1024 / 1024 for default / thinking / p2r); the perceive pass gets
    `perceive_max_new_tokens` (default 256, at most `max_new_tokens` when that is given).
    `temperature`, `top_p`, `top_k` (0 = off), `repetition_penalty` (1.0 = off) and `stop`
    (strings separated by "|") apply to every pass. `image_mode` (release | robust) turns inputs
    into RGB. Extra model args go to the backend's engine as they are (e.g.
    `tensor_parallel_size` for vllm, `timeout_s` for openai), except vllm's `data_parallel_size`:
    the number of processes (see the module docstring). `batch_size` (lmms-eval's `--batch_size`)
    is the hf batch; vllm and openai keep `concurrency` samples in flight, per process. The openai
    backend's key is `api_key`, else the file named by $P2R_API_KEY_FILE (mode 600), else $P2R_API_KEY
    (`api_key_env` names another variable).

    Mixed roles (p2r mode only): `perceiver_pretrained`, `perceiver_backend`, `perceiver_base_url` and
    `perceiver_served_model` name the perceive pass's engine as the unprefixed ones name the reasoner's
    (an unnamed perceiver model is `pretrained`). Its key is read like the reasoner's from
    $P2R_PERCEIVER_API_KEY_FILE / $P2R_PERCEIVER_API_KEY (`perceiver_api_key_env` names another
    variable); a key in the model args is refused. `perceiver_max_pixels` / `perceiver_min_pixels` and
    `perceiver_temperature`, `perceiver_top_p`, `perceiver_top_k`, `perceiver_repetition_penalty`,
    `perceiver_stop` set the perceive pass's own pixels and decoding (default: the reasoner's); any other
    `perceiver_X` goes to the perceiver's engine as `X` (e.g. `perceiver_timeout_s`).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        mode: str = "p2r",
        backend: str = "auto",
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = API_KEY_ENV,
        served_model: str | None = None,
        max_pixels: int = 4096 * 32 * 32,
        min_pixels: int = 16 * 32 * 32,
        crop_max_pixels: int | None = None,
        max_new_tokens: int | None = None,
        perceive_max_new_tokens: int | None = None,
        temperature: float = RELEASE_DECODING.temperature,
        top_p: float = RELEASE_DECODING.top_p,
        top_k: int = RELEASE_DECODING.top_k,
        repetition_penalty: float = RELEASE_DECODING.repetition_penalty,
        stop: str = "",
        image_mode: str = "release",
        batch_size: int | str = 1,
        device: str = "auto",
        dtype: str = "auto",
        concurrency: int = 32,
        record_cache: str | None = None,
        max_batch_size: int | None = None,  # lmms-eval's --max_batch_size, for `auto` batch sizes: unused
        perceiver_pretrained: str | None = None,
        perceiver_backend: str | None = None,
        perceiver_base_url: str | None = None,
        perceiver_served_model: str | None = None,
        perceiver_api_key_env: str = PERCEIVER_API_KEY_ENV,
        perceiver_max_pixels: int | None = None,
        perceiver_min_pixels: int | None = None,
        perceiver_temperature: float | None = None,
        perceiver_top_p: float | None = None,
        perceiver_top_k: int | None = None,
        perceiver_repetition_penalty: float | None = None,
        perceiver_stop: str | None = None,
        **engine_kwargs,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"p2r: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        check_image_mode(image_mode)
        self.mode, self.image_mode = mode, image_mode
        backend = resolve_backend(backend, base_url)
        self.budget = PixelBudget(
            max_pixels=int(max_pixels), min_pixels=int(min_pixels), crop_max_pixels=int(crop_max_pixels or max_pixels)
        )
        own_decoding = (
            perceiver_temperature, perceiver_top_p, perceiver_top_k, perceiver_repetition_penalty, perceiver_stop
        )  # fmt: skip
        mixed, perceiver_kwargs = perceiver_engine_args(
            mode, (perceiver_pretrained, perceiver_backend, perceiver_base_url, perceiver_served_model),
            (perceiver_max_pixels, perceiver_min_pixels), own_decoding, engine_kwargs, perceiver_api_key_env,
        )  # fmt: skip
        self.perceive_budget = replace(
            self.budget,
            max_pixels=int(perceiver_max_pixels or self.budget.max_pixels),
            min_pixels=int(perceiver_min_pixels or self.budget.min_pixels),
        )
        reasoner_decoding = (temperature, top_p, top_k, repetition_penalty, stop)
        sampling = decoding(RELEASE_DECODING, *reasoner_decoding)
        # The perceive pass decodes as the reasoner unless told otherwise, argument by argument.
        perceive_decoding = [o if o is not None else r for o, r in zip(own_decoding, reasoner_decoding)]
        perceive_sampling = decoding(RELEASE_DECODING, *perceive_decoding)
        answer_tokens = int(max_new_tokens or RELEASE_MAX_NEW_TOKENS[mode])
        perceive_tokens = perceive_max_new_tokens or min(RELEASE_MAX_NEW_TOKENS["perceive"], answer_tokens)
        self.params = replace(sampling, max_new_tokens=answer_tokens)
        self.perceive_params = replace(perceive_sampling, max_new_tokens=int(perceive_tokens))
        if not str(batch_size).isdigit():
            raise ValueError(f"p2r: batch_size must be a positive integer, got {batch_size!r}")
        self.accelerator = Accelerator()
        self._rank, self._world_size, self._local_rank = placement(self.accelerator)
        on_gpu = self._world_size > 1 and torch.cuda.is_available()
        self._device = torch.device(f"cuda:{self._local_rank}") if on_gpu else self.accelerator.device
        if device in ("auto", "cuda") and self._world_size > 1:
            device = str(self._device)  # cuda:{local_rank}, or cpu under accelerate's CPU path
        shared = {"device": device, "dtype": dtype, "batch_size": int(batch_size), "concurrency": int(concurrency)}
        reasoner_key = api_key or registration.cli_api_key
        reasoner_key = reasoner_key or (key_from_env(api_key_env) if backend == "openai" else None)
        self.engine, reasoner = self._make_engine(
            "reasoner", backend, pretrained, base_url, served_model, reasoner_key, self.budget, shared, engine_kwargs
        )
        # (perceive engine, reason engine) as the pipeline gets them; mixed, each names its role if its service fails.
        self._roles, self.perceiver_engine, perceiver = (self.engine, self.engine), None, reasoner
        if mixed:
            perceiver_backend = resolve_backend(perceiver_backend or "auto", perceiver_base_url)
            if perceiver_backend == "vllm" and self._world_size > 1:
                raise ValueError("p2r: a vllm perceiver runs in one-process runs only; serve it (perceiver_base_url)")
            self.perceiver_engine, perceiver = self._make_engine(
                "perceiver", perceiver_backend, perceiver_pretrained or (None if perceiver_base_url else pretrained),
                perceiver_base_url, perceiver_served_model,
                key_from_env(perceiver_api_key_env) if perceiver_backend == "openai" else None,
                self.perceive_budget, shared, perceiver_kwargs,
            )  # fmt: skip
            self._roles = (RoleEngine("perceiver", self.perceiver_engine, perceiver),
                           RoleEngine("reasoner", self.engine, reasoner))  # fmt: skip
        # Which model and backend produce each pass: written into every record's envelope.
        self.passes = {"perceive": perceiver, "answer": reasoner} if mode == "p2r" else {"answer": reasoner}
        self.chunk_size = int(batch_size) if backend == "hf" else int(concurrency)
        if record_cache and self._world_size > 1:
            record_cache = f"{record_cache}.rank{self._rank}of{self._world_size}"  # one writer per file
        self.journal = Journal(record_cache) if record_cache else None
        # What makes a cached record valid for this run: the model and every setting that changes its answer.
        self._identity = [served_model or pretrained, mode, self.budget.max_pixels, self.budget.min_pixels,
                          self.budget.crop_max_pixels, image_mode, repr(self.params), repr(self.perceive_params)]
        if mixed:  # a run with one engine keeps the identity (and so the cached records) it always had
            self._identity += [perceiver, self.perceive_budget.max_pixels, self.perceive_budget.min_pixels]

    @property
    def device(self) -> torch.device:
        """This process's device; lmms-eval gathers the per-rank request counts on it."""
        return self._device

    def _make_engine(self, role: str, backend: str, pretrained: str | None, base_url: str | None,
                     served_model: str | None, api_key: str | None, budget: PixelBudget, shared: dict,
                     engine_kwargs: dict) -> tuple[Engine, dict[str, str]]:  # fmt: skip
        """One role's engine and what records say about it; the reasoner's arguments are today's `p2r` ones."""
        prefix = "" if role == "reasoner" else PERCEIVER
        if backend == "openai":
            model = served_model or pretrained
            if not (base_url and model):
                needs = f"{prefix}base_url and {prefix}served_model (or {prefix}pretrained)"
                raise ValueError(f"p2r: {prefix}backend=openai needs {needs}")
            engine_kwargs.update(base_url=base_url, model=model, api_key=api_key, concurrency=shared["concurrency"])
        elif pretrained is None:
            raise ValueError(f"p2r: {prefix}pretrained is required (a hub id, a local directory, or p2r-tiny)")
        elif backend == "hf":
            model = pretrained
            engine_kwargs.update(pretrained=pretrained, **{k: shared[k] for k in ("device", "dtype", "batch_size")})
        else:
            model = pretrained
            self._place_vllm(engine_kwargs)
            engine_kwargs.update(pretrained=pretrained, dtype=shared["dtype"])
        engine = make_engine(backend, budget=budget, **engine_kwargs)
        if pretrained and is_toy(pretrained):
            logger.warning(
                f"p2r: {'the ' + role + ' is ' if prefix else ''}the offline tiny toy model (random, or trained on "
                "synthetic scenes only): its scores are not a benchmark result."
            )
        return engine, describe(backend, model, base_url)

    def _place_vllm(self, engine_kwargs: dict) -> None:
        """Data parallelism for vllm is lmms-eval's process split: one engine per process, on its own GPUs.

        `data_parallel_size`, when given, must equal the number of processes; it is not passed to vLLM,
        whose offline engine does not replicate itself. `tensor_parallel_size` goes to vLLM as it is.
        """
        replicas = int(engine_kwargs.pop("data_parallel_size", self._world_size))
        if replicas != self._world_size:
            raise ValueError(
                f"p2r: data_parallel_size={replicas} but {self._world_size} process(es): run "
                f"`accelerate launch --num_processes {replicas} -m lmms_eval --model p2r ...`, one engine per process"
            )
        if self._world_size > 1 and torch.cuda.is_available():
            # vLLM's engine runs in a process it spawns, which reads this variable when it starts.
            per_process = int(engine_kwargs.get("tensor_parallel_size", 1))
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu_slice(self._local_rank, per_process, visible)

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        if self._world_size > 1:
            logger.info(f"p2r: rank {self._rank} of {self._world_size} answers {len(requests)} requests")
        collator = utils.Collator(
            [request.args for request in requests], lambda args: (-len(args[0]), args[0]), grouping=True
        )
        replies: list[GenerationResult] = []
        errors: list[str] = []
        with tqdm(total=len(requests), desc=f"p2r {self.mode}", unit="sample", disable=self.rank != 0) as bar:
            for chunk in collator.get_batched(n=self.chunk_size):
                try:
                    answered = self._answer(chunk)
                except (ServiceUnavailable, RequestRejected) as exc:
                    kept = "not kept (set record_cache=PATH to keep them)"
                    if self.journal is not None:
                        kept = f"kept in {self.journal.path}: run again to resume"
                    # SystemExit, not an Exception: lmms-eval 0.7.3 logs Exceptions and exits 0, which would
                    # let a script take a run that wrote no scores for a success.
                    raise SystemExit(
                        f"{exc}\np2r: stopped after {len(replies)} of {len(requests)} samples, no scores written; "
                        f"the finished samples are {kept}"
                    ) from None
                for record, reply in answered:
                    replies.append(reply)
                    if record.error is not None:
                        errors.append(f"{record.id}: {record.error}")
                bar.update(len(chunk))
        if errors:
            logger.warning(
                f"p2r: {len(errors)} of {len(requests)} samples failed and count as wrong; first: {errors[0]}"
            )
        for engine in filter(None, (self.perceiver_engine, self.engine)):
            client = getattr(engine, "client", None)
            if client is not None and client.stats["retries"]:
                stats = client.stats
                logger.warning(
                    f"p2r: {client.name} service at {client.base_url}: {stats['retries']} retries and "
                    f"{stats['waited_s']:.1f} s of waiting over {stats['requests']} requests; it recovered each time"
                )
        return collator.get_original(replies)

    def _answer(self, chunk: list[tuple]) -> list[tuple[Record, GenerationResult]]:
        """Records and replies of one batch of request args (all with the same generation kwargs)."""
        gen_kwargs = chunk[0][1]
        perceive_engine, reason_engine = self._roles
        pipeline = Pipeline(
            reason_engine,
            self.mode,
            params=self.params,
            perceive_params=self.perceive_params,
            budget=self.budget,
            image_mode=self.image_mode,
            perceive_engine=perceive_engine,
            perceive_budget=self.perceive_budget,
        )
        ours = ANSWER_FORM_KEY in gen_kwargs
        samples: list[Sample] = []
        known: dict[int, Record] = {}
        keys: list[str] = []
        for i, (context, _, doc_to_visual, doc_id, task, split) in enumerate(chunk):
            sample_id = f"{task}/{doc_id}"
            keys.append(self._key(context, doc_id, task, split))
            if self.journal is not None and keys[-1] in self.journal:
                known[i] = Record(**self.journal.get(keys[-1]))
                continue
            try:
                images = doc_to_visual(self.task_dict[task][split][doc_id])
            except Exception as exc:  # any bad doc stays a per-sample error
                known[i] = Record(id=sample_id, mode=self.mode, error=f"image: {type(exc).__name__}: {exc}")
                continue
            # Our tasks' text is the dataset's question, kept byte for byte as the release does;
            # another task's prompt loses its <image> tokens and the whitespace around them.
            question = context if ours else context.replace("<image>", "").strip()
            form, letters = guess_answer_form(question)
            form = gen_kwargs.get(ANSWER_FORM_KEY, form)
            samples.append(Sample(sample_id, question, list(images or []), answer_form=form, letters=letters))
        records = iter(pipeline.run(samples))
        answered = [known[i] if i in known else next(records) for i in range(len(chunk))]
        if self.journal is not None:
            for key, record in zip(keys, answered):
                if record.error is None and key not in self.journal:
                    self.journal.add(key, record.to_dict(), id=record.id)
        return [(record, self._reply(record, ours, self.passes)) for record in answered]

    def _key(self, context: str, doc_id, task: str, split: str) -> str:
        return hashlib.sha256(json.dumps([*self._identity, task, split, doc_id, context]).encode()).hexdigest()

    @staticmethod
    def _reply(record: Record, ours: bool, passes: dict) -> GenerationResult:
        tokens = TokenCounts(input_tokens=record.input_tokens, output_tokens=record.output_tokens)
        if ours:
            return GenerationResult(envelope.wrap(record, passes), tokens)
        if record.error is not None:
            # Empty replies are scored wrong by the task and never cached, so --use_cache retries them.
            return GenerationResult("", tokens)
        return GenerationResult(record.answer if record.answer is not None else record.raw_answer, tokens)

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "p2r generates answers (perceive, then reason); it cannot score loglikelihood requests. "
            "Use tasks with output_type: generate_until."
        )

    def generate_until_multi_round(self, requests: list[Instance]):
        raise NotImplementedError("p2r answers single-turn questions; multi-round generation is not supported.")
