"""The typed config tree: one dataclass per section, each field with its valid range."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An invalid configuration; the message is one line that names the fix."""


@dataclass
class LMConfig:
    """The Llama-family decoder. With `path`, the checkpoint's own config.json replaces every
    shape field below (`furnace.model.llama.from_hf`), and they are not checked."""
    path: str | None = None            # local HF checkpoint dir (Llama / Mistral / Qwen2); None = from scratch
    vocab_size: int = 0                # >= 0; from scratch: 0 = size of the tokenizer
    hidden_size: int = 256             # >= 1; a multiple of num_heads when head_dim = 0
    intermediate_size: int = 704       # >= 1; a multiple of parallel.tp
    num_layers: int = 4                # >= 1; >= parallel.pp and >= model.xattn.every
    num_heads: int = 8                 # >= 1; a multiple of num_kv_heads and of parallel.tp
    num_kv_heads: int = 4              # >= 1; divides num_heads; a multiple of parallel.tp
    head_dim: int = 0                  # >= 0; 0 = hidden_size // num_heads; the head dim must be even (RoPE)
    max_position_embeddings: int = 2048  # >= 1
    rope_theta: float = 10000.0        # finite, > 0
    rope_scaling: dict | None = None   # None or {"rope_type": "default" | "linear" | "llama3", ...} as in HF configs
    rms_norm_eps: float = 1e-5         # finite, > 0
    tie_word_embeddings: bool = True
    qkv_bias: bool = False             # Qwen2
    o_bias: bool = False               # Llama's attention_bias sets qkv_bias and o_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # None or >= data.max_length (Mistral: longer sequences are refused)
    model_type: str = "llama"          # llama | mistral | qwen2: the architecture export writes

    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class VisionConfig:
    """The vision tower. With `path`, the checkpoint's config replaces the shape fields below."""
    path: str | None = None            # local HF CLIP/SigLIP dir; None = from scratch (below)
    kind: str = "clip"                 # clip | siglip (from scratch)
    image_size: int = 32               # >= 1; a multiple of patch_size
    patch_size: int = 8                # >= 1
    hidden_size: int = 128             # >= 1; a multiple of num_heads
    intermediate_size: int = 512       # >= 1
    num_layers: int = 2                # >= 1
    num_heads: int = 4                 # >= 1
    sincos_positions: bool = True      # from scratch: start the position rows at a 2-D sin-cos code
    # What the resampler reads (also with `path`): hidden = every token of the last layer, as HF
    # returns it; patches = CLIP's patch tokens before its final norm (open_flamingo's features);
    # patches_normed = after it (open_clip >= 2.23's output_tokens). CLIP towers only, but hidden.
    features: str = "hidden"


@dataclass
class PerceiverConfig:
    num_latents: int = 64              # >= 1
    depth: int = 6                     # >= 1
    heads: int = 8                     # >= 1; a multiple of parallel.tp
    dim_head: int = 64                 # >= 1
    ff_mult: int = 4                   # >= 1
    max_frames: int = 8                # >= 1: frames per media item
    # IDEFICS' resampler differs in three ways, each a key: no media-time (frame) embeddings, a
    # LayerNorm over each head's queries and keys, and a ReLU feed-forward.
    frame_embeddings: bool = True
    # The frame embeddings' standard deviation at init. 0.02 leaves them ~1/60 of the tower's
    # features: a clip's frame order then takes a long plateau to learn (demo-video: 1.0,
    # open_flamingo's torch.randn draw). For stills (one frame) it is a constant shift.
    frame_init: float = 0.02           # finite, >= 0
    qk_norm: bool = False
    ff_act: str = "gelu"               # gelu | relu


@dataclass
class XAttnConfig:
    every: int = 4                     # 1..model.lm.num_layers: a gated xattn block before every k-th decoder layer
    heads: int = 8                     # >= 1; a multiple of parallel.tp
    dim_head: int = 64                 # >= 1
    ff_mult: int = 4                   # >= 1
    # tanh gates start at 0 so a pretrained LM is untouched at step 0 (Flamingo). An LM trained
    # from scratch has nothing to protect; closed gates only delay learning to look.
    gate_init: float = 0.0             # finite
    # open_flamingo's block (the default) or IDEFICS' (placement first, norm rmsnorm, ff swiglu
    # with ff_hidden = the LM's intermediate size, qk_norm, gate vector, reset_after_eos).
    placement: str = "last"            # last | first: before the last / first decoder layer of each group of `every`
    norm: str = "layernorm"            # layernorm | rmsnorm (with the LM's rms_norm_eps)
    ff: str = "gelu"                   # gelu (norm, fc1, GELU, fc2) | swiglu (norm, gate_proj, up_proj, down_proj)
    ff_hidden: int = 0                 # >= 0; 0 = ff_mult x the LM's width; a multiple of parallel.tp
    qk_norm: bool = False              # an RMSNorm over each head's queries and keys
    gate: str = "scalar"               # scalar | vector: one tanh gate per block, or one per channel
    # A token after the tokenizer's EOS sees no image until the next <image> (IDEFICS' rule for
    # documents packed back to back).
    reset_after_eos: bool = False
    # The cross-attention kernel: general (flash attention with segment masks, measured on a GPU)
    # or media (media_attention, specialised to the Flamingo mask; opt-in until a GPU measures it).
    kernel: str = "general"


@dataclass
class AudioConfig:
    """The audio tower, a Whisper-shaped encoder: Whisper's log-mel front end (computed in the
    model from the waveform), two conv1d layers (the second strided by 2), transformer layers.
    `none`: a model without audio (and no <audio> token). With `path` (kind whisper) the
    checkpoint's config.json and preprocessor_config.json replace every field below."""
    kind: str = "none"                 # none | scratch (drawn from the fields below) | whisper (a local HF folder)
    path: str | None = None            # whisper: a local HF Whisper folder (WhisperModel or ...ForConditionalGeneration)
    sample_rate: int = 16000           # >= 1 Hz: clips at any other rate are skipped (wrong_sample_rate)
    seconds: float = 1.0               # finite, > 0: the window the tower reads; longer clips are cut, shorter padded
    num_mel_bins: int = 80             # >= 1
    n_fft: int = 400                   # >= 2: STFT window (Hann), samples
    hop_length: int = 160              # >= 1: STFT hop, samples (a mel frame every hop; the encoder halves the rate)
    hidden_size: int = 64              # >= 1; a multiple of num_heads
    intermediate_size: int = 256       # >= 1
    num_layers: int = 2                # >= 1
    num_heads: int = 4                 # >= 1


# The decoder layer's linear layers LoRA can adapt, by short name: (parent module, HF leaf name).
LORA_TARGETS = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"), "v": ("self_attn", "v_proj"),
                "o": ("self_attn", "o_proj"), "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}

# The fused Triton kernels `model.fused_kernels` can switch on (furnace_kernels' op names).
FUSED_OPS = ("rms_norm", "add_rms_norm", "swiglu", "rope", "linear_cross_entropy")


@dataclass
class LoraConfig:
    """Low-rank adapters on the frozen LM's linear layers (y = W x + alpha/rank * B A x), trained
    with the resampler and the xattn blocks; needs model.freeze_lm."""
    rank: int = 0                      # >= 0; 0 = no adapters
    alpha: float = 16.0                # finite, > 0; the update is scaled by alpha / rank
    dropout: float = 0.0               # 0 <= dropout < 1, on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # distinct names of LORA_TARGETS


@dataclass
class ContrastiveConfig:
    """CLIP-style image-text alignment (Flamingo's contrastive pre-training objective): the
    resampler's latents (mean over each sample's images) and the token embeddings of its text
    (through a small text encoder: one self-attention block, mean-pooled), projected to `dim`;
    an InfoNCE loss with a learned temperature, weighted by train.contrastive_weight. The text
    side reads the embeddings, before any xattn block: it never sees the image it is matched to."""
    dim: int = 0                       # >= 0; 0 = no contrastive heads
    text_width: int = 256              # >= 1: the text encoder's width (64-wide heads; one head if not a multiple of 64)
    temperature: float = 0.07          # finite, > 0: the learned temperature's start (CLIP's)


@dataclass
class ModelConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    # The audio tower and its own resampler (same num_latents as model.perceiver: every medium
    # gives the xattn blocks the same number of latents); used when model.audio.kind != none.
    audio: AudioConfig = field(default_factory=AudioConfig)
    audio_perceiver: PerceiverConfig = field(default_factory=lambda: PerceiverConfig(max_frames=1))
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    freeze_lm: bool = True
    freeze_vision: bool = True
    freeze_audio: bool = True          # the audio tower (a scratch one must train: false)
    activation_checkpointing: bool = False
    attention_backend: str = "auto"    # auto | triton | reference (self- and cross-attention kernels)
    # torch.compile for the media path, per block (furnace/model/compile.py): none, or a comma
    # list of vision (the tower's encoder layers) and perceiver (the resampler's blocks).
    compile: str = "none"
    # Fused kernels in the model (furnace/model/fused.py): none, all, or a comma list of FUSED_OPS.
    # The same math; their implementation follows attention_backend (Triton on CUDA with auto).
    fused_kernels: str = "none"
    # A pretrained Flamingo to start from: a furnace export folder (OUT/flamingo) or open_flamingo's
    # checkpoint.pt. Its resampler, xattn blocks and new token rows (open_flamingo: its embedding
    # rows) replace the drawn ones, and it decides their shapes; the LM and tower still come from
    # model.lm.path / model.vision.path. None = draw them.
    start_from: str | None = None


@dataclass
class DataConfig:
    # Brace patterns of webdataset shards; ';' separates sources to mix. Training needs at least
    # one shard of every train source; "" val_shards = no evaluation.
    train_shards: str = ""
    val_shards: str = ""
    # A local HF tokenizer dir; None = the pretrained LM's own (model.lm.path), or the synthetic
    # set's (data.synthetic_dir); a from-scratch LM on your data needs one.
    tokenizer: str | None = None
    max_length: int = 64               # >= 4 tokens a row; 0 = the longest of the first 1000 samples (<= LM positions)
    max_images: int = 1                # >= 1 per sample (and per row when packing)
    # F, the frames of each medium in a batch (images [B, T, F, C, H, W]): clips (.mp4/.webm) and
    # frame folders (key.0.jpg ...) are sampled uniformly to F frames, those with fewer skipped
    # (too_few_frames); a still image fills all F. 1 <= F <= model.perceiver.max_frames.
    video_frames: int = 1
    # Training rows hold several samples back to back, up to max_length tokens and max_images
    # images (segment ids keep their attention, positions and images apart; the loss is the
    # unpacked one): short captions stop being mostly padding.
    pack: bool = False
    num_workers: int = 1               # >= 0; 0 = decode in the training process
    # The training order is a function of (seed, sources, weights) through this many canonical
    # streams, whatever the cluster shape; the data-parallel size must divide it (docs/data.md).
    canonical_streams: int = 64        # >= 1
    shuffle_buffer: int = 128          # >= 0 raw samples held per canonical stream; 0 = no shuffle
    # The synthetic shapes set is drawn here when its shards are missing (the demo preset); None = never.
    synthetic_dir: str | None = None
    synthetic_n: int = 20000           # >= 1 samples
    # None, or one finite weight > 0 per ';'-separated train_shards source, e.g. "0.7,0.3"
    train_weights: str | None = None
    synthetic_seed: int = 0            # >= 0
    synthetic_image_size: int = 32     # >= 8 pixels the synthetic set is drawn at (the loader resizes)
    synthetic_kind: str = "shapes"     # shapes (still images) | video (moving shapes, demo-video) | audio (tones, demo-audio)
    # Bounds on what one untrusted shard can make a loader worker read or decode; what exceeds
    # them is skipped and counted, never decoded. Each >= 1.
    max_member_bytes: int = 32 * 2**20        # one tar member (an image, a caption, a document)
    max_members_per_sample: int = 256         # members under one sample key
    max_image_pixels: int = 40_000_000        # width x height, read from the header before decoding
    max_shard_bytes: int = 4 * 2**30          # bytes a compressed shard may expand to
    max_video_frames: int = 1024              # frames of one clip, counted before any is decoded
    # Audio clips (with model.audio): longer ones are skipped (audio_too_long, counted as they
    # decode: the decoding work is bounded by it), shorter ones too (audio_too_short). Finite, > 0.
    max_audio_seconds: float = 600.0
    min_audio_seconds: float = 0.05


@dataclass
class ParallelConfig:
    tp: int = 1                        # >= 1; tp * pp divides the world size
    pp: int = 1                        # >= 1; pp > 1 needs zero_stage 1
    zero_stage: int = 3                # 0..3; tp > 1 with pp = 1 needs 3
    zero3_gather: str = "block"        # block | module: ZeRO-3 gathers whole repeated blocks or every module
    # ZeRO-Offload / ZeRO-Infinity: where the optimizer state (ZeRO 1-3) and the parameters
    # (ZeRO-3) live between uses: none (the device) | cpu (host memory) | nvme (offload_nvme_path).
    offload_optimizer: str = "none"
    offload_params: str = "none"
    offload_nvme_path: str | None = None   # a local NVMe folder, for nvme
    # manual: the keys above as set; auto: furnace-plan's fastest layout for the ranks started and
    # the device memory (tp, pp, zero_stage, offload_optimizer, train.micro_batch_size and
    # model.activation_checkpointing are replaced; the choice is printed)
    layout: str = "manual"


@dataclass
class TrainConfig:
    max_steps: int = 1000              # >= 1
    run_dir: str = "runs/run"          # non-empty
    save_every: int = 500              # >= 0; 0 = only at the end
    eval_every: int = 250              # >= 0; 0 = never
    log_every: int = 10                # >= 1
    seed: int = 1234                   # 0..2**63-1
    global_batch_size: int = 32        # >= 1 samples per optimizer step, a multiple of micro_batch_size x dp
    micro_batch_size: int = 8          # >= 1
    precision: str = "bf16"            # bf16 | fp16 | fp32
    lr: float = 1e-3                   # finite, >= 0
    min_lr_ratio: float = 0.1          # 0..1: the cosine's floor as a fraction of lr
    warmup_steps: int = 50             # >= 0
    lr_decay_steps: int = 0            # >= 0; cosine horizon; 0 = max_steps (set it to extend a run exactly)
    keep_checkpoints: int = 2          # >= 1
    weight_decay: float = 0.0          # finite, >= 0
    grad_clip: float = 1.0             # finite, >= 0; 0 = no clipping
    contrastive_weight: float = 0.0    # finite, >= 0: the contrastive loss's weight next to the LM loss (needs model.contrastive.dim)
    fused_loss_scaling: bool = True    # fp16: furnace's fused grad stats instead of DeepSpeed's
    # Resuming with a changed config that the checkpoint cannot honour (model shape, layout,
    # data, seed, batch sizes) is refused unless this is set.
    allow_config_change: bool = False
    dist_timeout_minutes: float = 30.0  # finite, > 0: how long a collective may wait for a rank before failing


@dataclass
class DebugConfig:
    """Diagnostics; none of them is needed to train."""
    log_gate_grads: bool = False       # record the xattn tanh gates' gradients as gate_grad/* metrics
    # Fault drills, a comma list of kind@step[:rank] (furnace/training/faults.py), kind in
    # inf | nan | die-write | die-marker | die-latest and rank < world size: inf@3, nan@2:1,
    # die-marker@6. "" = none.
    faults: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
