"""A tiny, randomly initialised FLUX.1 pipeline folder, built offline, for tests.

`build_tiny_flux(dir)` writes a complete diffusers `FluxPipeline` folder (model_index.json plus the
seven parts: transformer, vae, text_encoder + tokenizer (CLIP), text_encoder_2 + tokenizer_2 (T5),
scheduler) that `FluxPipeline.from_pretrained(dir)` and `flux.load_flux(dir)` load with no network.
Every part has FLUX.1-dev's *layout* (double-stream + single-stream blocks, guidance embedding,
2x2 latent packing, RoPE over (text, row, column) ids, T5 sequence + CLIP pooled conditioning,
FLUX's VAE scaling/shift factors and FLUX.1-dev's scheduler config) at toy width, so that code
written against this folder runs unchanged on the real 12B model.

Sizes (chosen so a 64x64 image generates in a few milliseconds per step on one CPU core):
    VAE: 3 resolution levels -> vae_scale_factor 4, latent_channels 4;
         64x64 image -> 16x16x4 latent -> 8x8 = 64 packed tokens of 4*2*2 = 16 channels.
    transformer: 1 double + 1 single block, 2 heads x 16 dims, axes_dims_rope (4, 6, 6) (sum = 16).
    CLIP text: width 32 (= pooled_projection_dim), T5 encoder: d_model 32 (= joint_attention_dim).
    Tokenizers: CLIP byte-level BPE over single characters plus merges for a few words; T5 Unigram
    over single characters plus a few whole words. Any ASCII prompt tokenizes.

Everything is seeded (`seed`), and the caller's global torch RNG state is left untouched.

Use in tests:
    from tiny_flux import build_tiny_flux
    model_dir = build_tiny_flux(tmp_path / "tiny_flux")
or the session-scoped pytest fixture (built once per test session):
    from tiny_flux import tiny_flux_dir      # noqa: F401  (pytest finds it by name)
    def test_x(tiny_flux_dir): ...
From a shell (e.g. to try train.py / eval.py by hand):
    python tests/tiny_flux.py /tmp/tiny_flux
"""

import os
import sys

import pytest
import torch

# Tiny sizes in one place. The packed channel count in_channels = LATENT_CHANNELS * 2 * 2.
LATENT_CHANNELS = 4
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16)  # vae_scale_factor = 2 ** (3 - 1) = 4
TEXT_WIDTH = 32  # CLIP hidden size = pooled_projection_dim; T5 d_model = joint_attention_dim
HEAD_DIM = 16
NUM_HEADS = 2
AXES_DIMS_ROPE = (4, 6, 6)  # FLUX splits each head's RoPE over (text index, row, column); sum = HEAD_DIM

# Words that get their own tokens (everything else falls back to single characters).
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "cube", "on", "the", "and", "with")

# FLUX.1-dev's VAE normalisation and scheduler configuration (from its published config files).
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def _clip_tokenizer():
    """Byte-level BPE in CLIP's format: every ASCII character, with and without the end-of-word
    suffix, plus merges that build each word in `_WORDS` left to right."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(33, 127)]  # printable ASCII without space (CLIP splits on spaces)
    vocab = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for word in _WORDS:
        # Merge "c a" -> "ca", then "ca t</w>" -> "cat</w>" (left to right, the last piece ends the word).
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            if merged not in vocab:
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    # As in the real CLIP vocabulary, the two special tokens come last.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    """Unigram tokenizer in T5's format: <pad>=0, </s>=1, <unk>=2, then sentencepiece pieces
    ("▁" marks a word start). Single characters make every ASCII prompt tokenizable; whole
    words get a higher score so the Unigram model prefers them."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    pieces += [("▁" + chr(c), -5.0) for c in range(33, 127)]
    pieces += [("▁" + w, -1.0) for w in _WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_flux(directory, seed: int = 0) -> str:
    """Write a tiny random FluxPipeline folder to `directory` (created if needed); return its path.

    Deterministic in `seed`; does not change the caller's global RNG state."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    directory = str(directory)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=NUM_HEADS,
            joint_attention_dim=TEXT_WIDTH,
            pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=True,  # FLUX.1-dev is guidance-distilled: guidance enters as an embedding
            axes_dims_rope=AXES_DIMS_ROPE,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=FLUX_VAE_SCALING_FACTOR,
            shift_factor=FLUX_VAE_SHIFT_FACTOR,
            use_quant_conv=False,  # as FLUX's VAE
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_WIDTH,
                intermediate_size=37,
                projection_dim=TEXT_WIDTH,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                # CLIP pools the hidden state at the first end-of-text token: its id must match the tokenizer's.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=TEXT_WIDTH,
                d_kv=8,
                d_ff=37,
                num_layers=1,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's text_encoder_2
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> str:
    """Session-scoped tiny FLUX folder (built once, ~1 s); import this name into a test module."""
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_flux.py OUTPUT_DIR")
    print(os.path.abspath(build_tiny_flux(sys.argv[1])))
