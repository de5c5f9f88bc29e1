"""A Hugging Face–shaped front door: ``SplitModelForCausalLM.from_pretrained(...).generate(...)``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.device import resolve_device, resolve_dtype
from ..model.loading import DEFAULT_MODEL, load_config, load_tokenizer, model_fingerprint
from ..model.lora import LoraSettings, add_lora, load_lora_state_dict, read_adapter
from ..model.segments import KVCache
from ..model.split import body_span, load_client_parts, load_part, num_layers
from ..wire.protocol import SessionConfig
from .core import LocalTransport, SplitClient
from .train import client_defense, defense_option_for_run, left_pad, load_run_defense

if TYPE_CHECKING:
    from ..privacy import Defense


def pad_lengths_from_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-row left-padding lengths (the only form of the mask that ever crosses the wire)."""
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    lengths = attention_mask.long().sum(-1)
    columns = torch.arange(input_ids.shape[1], device=attention_mask.device)
    expected = (columns[None] >= (input_ids.shape[1] - lengths)[:, None]).long()
    if not torch.equal(expected, attention_mask.long()):
        raise ValueError("fedsplit expects left padding (tokenizer.padding_side = 'left')")
    return input_ids.shape[1] - lengths


class SplitModelForCausalLM:
    """Head and tail here, body in this process or on a fedsplit server."""

    def __init__(self, client: SplitClient, tokenizer, spec: str, head_layers: int, tail_layers: int) -> None:
        self.client, self.tokenizer, self.spec = client, tokenizer, spec
        self.head_layers, self.tail_layers = head_layers, tail_layers

    @property
    def device(self) -> torch.device:
        """Where head and tail compute (as a Hugging Face model's ``device``)."""
        return self.client.device

    @classmethod
    def from_pretrained(
        cls,
        spec: str = DEFAULT_MODEL,
        server: str | None = None,
        head_layers: int = 2,
        tail_layers: int = 2,
        token: str | None = None,
        tls_ca: str | None = None,
        wire_dtype: str = "fp16",
        defense: Defense | str | None = None,
        adapters: str | Path | None = None,
        lora: LoraSettings | None = None,
        reconnect: bool = True,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> SplitModelForCausalLM:
        """Load head and tail of ``spec``; ``server=None`` loads the body here too.

        ``adapters`` is a directory with ``head/`` and ``tail/`` adapters (as ``fedsplit train`` writes).
        ``lora`` adds fresh trainable adapters (for fine-tuning).
        ``defense`` transforms the hidden states sent to the body: a spec (``"gaussian:0.1:relative"``,
        ``"adv:0.1"``; grammar in ``docs/privacy.md``), ``"none"`` for none, a
        :class:`~fedsplit.privacy.Defense` module (used as it is), or ``None`` for the default defence
        (:func:`fedsplit.privacy.defaults.resolve_defense_spec`). With ``adapters`` and ``defense=None``,
        the run's own defence is used; the run's trained defence state (``defense/``, ``adv`` or
        ``mid``) is loaded whenever the defence is the one the run was trained with, and a warning
        says when it is not. A defence built from a spec is put in eval mode unless ``lora`` is given.
        Without any defence, a warning (once per process) says what a curious server can read.
        ``reconnect`` (remote only): a generation whose server restarts reconnects and replays what it
        sent, then continues the same output (:mod:`fedsplit.client.resilience`).
        ``device`` ("auto", "cpu", "cuda", "cuda:N" or a ``torch.device``) and ``dtype`` ("auto",
        "fp32", "bf16", "fp16" or a ``torch.dtype``) place head and tail, and the body when it is
        loaded here; "auto" is CUDA + bf16 where torch sees a GPU, else CPU + fp32. A server chooses
        its own device and dtype: the hidden states travel in ``wire_dtype`` whatever both compute in.
        Inputs may sit on any device; ``generate`` returns its tokens on the device of ``input_ids``.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = load_config(spec)
        span = body_span(num_layers(config), head_layers, tail_layers)
        head, tail = load_client_parts(spec, head_layers, tail_layers, dtype=dtype, device=device)
        if adapters is not None:
            for name, segment in (("head", head), ("tail", tail)):
                state, settings = read_adapter(Path(adapters) / name)
                add_lora(segment, settings)
                load_lora_state_dict(segment, state)
        elif lora is not None:
            add_lora(head, lora)
            add_lora(tail, lora)
        if defense is None or isinstance(defense, str):
            from ..privacy.defaults import resolve_defense_spec

            option = defense_option_for_run(defense, adapters) if adapters is not None else defense
            defense = client_defense(resolve_defense_spec(option), head)
            if defense is not None and lora is None:
                defense.eval()  # generation: MID sends its posterior mean, adv trains nothing
        else:
            defense.to(device)  # a trainable defence (MID, adv) computes beside the head
        if defense is None:
            from ..privacy.defaults import warn_undefended

            warn_undefended(head_layers)
        if server is None:
            transport = LocalTransport(load_part(spec, "body", span=span, dtype=dtype, device=device))
        else:
            from .remote import RemoteTransport

            transport = RemoteTransport(
                server,
                token=token,
                tls_ca=tls_ca,
                wire_dtype=wire_dtype,
                fingerprint=model_fingerprint(spec),
                tls_cert=tls_cert,
                tls_key=tls_key,
            )
            if reconnect:
                from .resilience import ReplayingTransport

                transport = ReplayingTransport(transport)
        client = SplitClient(head, tail, transport, span, defense=defense)
        if adapters is not None and (Path(adapters) / "body").exists():
            state, settings = read_adapter(Path(adapters) / "body")
            client.body_adapter = (settings, state)
        if adapters is not None:
            load_run_defense(client, adapters)
        return cls(client, load_tokenizer(spec), spec, head_layers, tail_layers)

    def encode_chat(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-template each prompt (when the tokenizer has one) and left-pad."""
        seqs = []
        for prompt in prompts:
            if getattr(self.tokenizer, "chat_template", None):
                ids = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
            seqs.append(list(ids))
        return left_pad(seqs, self.tokenizer.pad_token_id)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        on_token=None,
    ) -> torch.Tensor:
        """Like ``transformers`` ``generate``: returns prompt + new tokens."""
        pad = pad_lengths_from_mask(attention_mask, input_ids)
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        new = self.client.generate(
            input_ids, pad, max_new_tokens, eos, temperature if do_sample else 0.0, top_p, on_token=on_token
        )
        return torch.cat([input_ids, new], dim=1)

    def chat(self, prompts: list[str] | str, max_new_tokens: int = 64, **kwargs) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        ids, pad = self.encode_chat(prompts)
        mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
        out = self.generate(ids, mask, max_new_tokens=max_new_tokens, **kwargs)
        return [self.tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True).strip() for row in out]

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """Keep the server-side (and local) caches across ``generate`` calls: multi-turn chat."""
        session = self.client.transport.open(
            SessionConfig(span=self.client.span, mode="generate", max_length=max_length, max_batch=batch_size)
        )
        state = InferenceSession(self, session)
        try:
            yield state
        finally:
            session.close()


class InferenceSession:
    """A conversation whose prefix stays cached on the client (head, tail) and the server (body)."""

    def __init__(self, model: SplitModelForCausalLM, session) -> None:
        self.model, self.session = model, session
        self.caches = (KVCache(), KVCache())
        self.offset = 0
        self.last_token: torch.Tensor | None = None

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Append ``input_ids`` (no padding) to the conversation and generate; returns the new tokens."""
        if self.last_token is not None:
            # The last sampled token was never fed back; it opens the next turn.
            input_ids = torch.cat([self.last_token, input_ids], dim=1)
        tokenizer = self.model.tokenizer
        pad = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        new = self.model.client.generate(
            input_ids,
            pad,
            max_new_tokens,
            kwargs.pop("eos_token_id", tokenizer.eos_token_id),
            session=self.session,
            caches=self.caches,
            offset=self.offset,
            **kwargs,
        )
        self.offset += input_ids.shape[1] + new.shape[1] - 1
        self.last_token = new[:, -1:]
        return new
