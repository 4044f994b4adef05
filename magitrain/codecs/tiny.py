"""Tiny random instances of the SAME library classes as the real codecs, for tests and the CPU demo.

Widths shrink; everything that fixes a downstream shape stays real: video stride 4x16x16 with 48
latent channels (Wan2.2 patchify 2 + three 2x downsamplings), audio hop 2048 with 64 latent
channels. The tokenizer is byte-level and built in memory, so nothing is downloaded.
"""

import torch
from diffusers import AutoencoderKLWan, AutoencoderOobleck
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5GemmaConfig, T5GemmaEncoderModel

from magitrain.codecs.audio import AudioCodec
from magitrain.codecs.container import Codecs, check_video_decoder
from magitrain.codecs.text import TextEncoder, read_prompt_file
from magitrain.codecs.turbo_vaed import TurboVAED, TurboVideoDecoder
from magitrain.codecs.video import VideoCodec

TINY_TEXT_WIDTH = 64


def tiny_video_vae() -> AutoencoderKLWan:
    # Same config as Wan2.2 except widths (base 160 -> 8, decoder 256 -> 8) and res blocks (2 -> 1).
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
        out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16,
    )  # fmt: skip


def tiny_turbo_vaed() -> TurboVAED:
    # The released config (TURBO_VAED.md) with widths 64/128/256/512 -> 8/8/16/16 and one resnet
    # per stage; the upsamplers, unpatchify and the 7/7 window plan stay: stride 4x16x16.
    return TurboVAED(decoder_block_out_channels=(8, 8, 16, 16), decoder_layers_per_block=(1, 1, 1, 1, 1))


def tiny_audio_vae() -> AutoencoderOobleck:
    # encoder_hidden_size must stay 128: the encoder's last conv emits mean and scale of the
    # 64 latent channels. Only the channel multiples and the decoder width shrink.
    return AutoencoderOobleck(
        encoder_hidden_size=128, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 1, 1, 1, 1],
        decoder_channels=8, decoder_input_channels=64, audio_channels=2, sampling_rate=44100,
    )  # fmt: skip


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one token per UTF-8 byte, `<bos>` first), Gemma's special-token ids."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_text_model(vocab_size: int) -> T5GemmaEncoderModel:
    module = dict(
        vocab_size=vocab_size, hidden_size=TINY_TEXT_WIDTH, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    config = T5GemmaConfig(encoder=module, decoder=module, is_encoder_decoder=False, vocab_size=vocab_size)
    return T5GemmaEncoderModel(config)


def build_tiny_codecs(
    seed: int = 0,
    negative_prompt: str = "blurry, distorted",
    negative_prompt_file: str | None = None,
    audio_window_seconds: float = 29.0,
    video_decoder: str = "wan",
    offload: bool = False,
) -> Codecs:
    """Random but deterministic (`seed`) tiny codecs on the CPU, float32. `video_decoder: turbo`
    adds a tiny Turbo-VAED (drawn after the others: the Wan, audio and text weights do not change)."""
    check_video_decoder(video_decoder)
    if negative_prompt_file is not None:
        negative_prompt = read_prompt_file(negative_prompt_file, "codecs.negative_prompt_file")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        video, audio = tiny_video_vae(), tiny_audio_vae()
        tokenizer = tiny_tokenizer()
        text = tiny_text_model(len(tokenizer))
        turbo = TurboVideoDecoder(tiny_turbo_vaed()) if video_decoder == "turbo" else None
    return Codecs(
        video=VideoCodec(video),
        audio=AudioCodec(audio, window_seconds=audio_window_seconds),
        text=TextEncoder(text, tokenizer, negative_prompt=negative_prompt, output_dtype=torch.float32),
        video_decoder=turbo,
        offload=offload,
    )
