"""The T5Gemma text encoder (transformers `T5GemmaEncoderModel`) with its tokenizer.

As in the release: the prompt is tokenised WITHOUT truncation, the whole sequence is encoded, then
the embedding is trimmed to 640 tokens. Only the first `lengths[b]` rows of sample b are real; the
rest is zero padding up to the batch's longest prompt, on the right whatever the tokenizer's
padding side.
"""

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, T5GemmaEncoderModel

MAX_TEXT_TOKENS = 640


class TextEncoder:
    """Frozen prompt encoder. Not an `nn.Module` on purpose: a LightningModule holding it must not
    register 9B frozen parameters into its checkpoints and optimisers.

    `offload=True` keeps the weights on the CPU and moves them to the device only inside `encode`
    (the encoder is used once per batch or per generation, so its memory is better spent elsewhere).
    """

    def __init__(
        self,
        model: T5GemmaEncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        negative_prompt: str = "",
        max_length: int = MAX_TEXT_TOKENS,
        batch_size: int = 8,
        offload: bool = False,
        output_dtype: torch.dtype = torch.float16,
    ):
        if not 0 < max_length <= MAX_TEXT_TOKENS:
            raise ValueError(f"TextEncoder: max_length must be in 1..{MAX_TEXT_TOKENS}, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.negative_prompt = negative_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.offload = offload
        self.output_dtype = output_dtype  # the release casts the hidden state to fp16 before use
        self.device = model.device

    @property
    def width(self) -> int:
        return self.model.config.encoder.hidden_size

    def to(self, device: torch.device | str) -> "TextEncoder":
        self.device = torch.device(device)
        if not self.offload:
            self.model.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (emb `[B, L, width]` zero-padded, lengths `[B]` long), L = longest, <= 640."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
            raise TypeError(f"TextEncoder.encode expects a non-empty list of strings, got {prompts!r:.80}")
        if self.offload:
            self.model.to(self.device)
        try:
            parts = [
                self._encode_batch(prompts[i : i + self.batch_size])
                for i in range(0, len(prompts), self.batch_size)
            ]
        finally:
            if self.offload:
                self.model.to("cpu")
        length = max(emb.shape[1] for emb, _ in parts)
        emb = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e, _ in parts])
        return emb, torch.cat([n for _, n in parts])

    def encode_negative(self, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt of classifier-free guidance, repeated `batch_size` times."""
        emb, lengths = self.encode([self.negative_prompt])
        return emb.repeat(batch_size, 1, 1), lengths.repeat(batch_size)

    def _encode_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each prompt's real tokens, in order, first: whatever side the tokenizer pads on (Gemma
        tokenizers may pad on the left), a row equals the prompt encoded alone, as the release does."""
        tokens = self.tokenizer(prompts, padding=True, truncation=False, return_tensors="pt").to(self.device)
        # RoPE is relative, so a left-padded prompt's shifted positions change nothing
        hidden = self.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).last_hidden_state
        mask = tokens.attention_mask.bool()
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # real tokens first
        hidden = hidden.gather(1, order[..., None].expand_as(hidden))[:, : self.max_length]
        lengths = mask.sum(1).clamp(max=self.max_length)
        real = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]
        emb = hidden * real[..., None].to(hidden.dtype)
        return emb.to(self.output_dtype), lengths


def read_prompt_file(path: str | Path, field: str) -> str:
    """A prompt kept in a UTF-8 text file (one trailing newline dropped); errors name `field`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{field}={path}: no such file")
    text = file.read_text(encoding="utf-8").removesuffix("\n")
    if not text.strip():
        raise ValueError(f"{field}={path} holds no text")
    return text
