//! A Llama-family decoder on tch, after Hugging Face's `modeling_llama.py` (Touvron et al.
//! 2023): RMSNorm, rotary position embeddings (rotate-half form, configurable theta),
//! grouped-query attention through libtorch's `scaled_dot_product_attention`, a SwiGLU MLP
//! and a tied or separate output head.
//!
//! Variables are named exactly as in HF checkpoints (`model.layers.{i}.self_attn.q_proj.weight`,
//! ...), so a `model.safetensors` maps onto the [`tch::nn::VarStore`] one to one.
//!
//! Entry points, in the shape of candle's llama.rs:
//! - [`Llama::embed`] then [`Llama::forward_embeds`]: the caller may splice vectors into the
//!   token embeddings first (the ID slots of RSLLM's unified prompts, see [`SlotOverrides`]);
//! - [`Llama::logits_at`]: the output head only at the positions a loss or a score needs,
//!   never the 49152-wide row for every position by default.
//!
//! Every op on the request path is the fallible `f_` form, so a shape problem is an error,
//! not a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::config::LlamaConfig;
use crate::error::{LlmError, Result};

/// A bias-free linear layer holding its `weight` as `[out, in]`, as HF stores it, with an
/// optional LoRA adapter beside it.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    lora: Option<Lora>,
    /// The frozen weight in autocast's dtype ([`Llama::keep_compute_copies`]). Autocast caches
    /// its casts only for weights that require gradients, so a frozen base weight would
    /// otherwise be cast again, one more kernel, at every use.
    compute: Option<Tensor>,
}

impl Linear {
    /// Fails (rather than panics) where libtorch cannot allocate the weight.
    fn new(path: &nn::Path, out_dim: usize, in_dim: usize) -> Result<Linear> {
        // Zeros: the weights are always loaded or initialised explicitly afterwards, and
        // filling 135M random numbers at every load would cost a second for nothing.
        let weight = path.f_var(
            "weight",
            &[out_dim as i64, in_dim as i64],
            nn::Init::Const(0.),
        )?;
        Ok(Linear {
            weight,
            lora: None,
            compute: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = compute_weight(&self.weight, self.compute.as_ref());
        let base = x.f_linear::<&Tensor>(weight, None)?;
        self.add_lora(x, base)
    }

    /// `base` (this layer's product of `x`, however computed) plus the adapter's, if any.
    fn add_lora(&self, x: &Tensor, base: Tensor) -> Result<Tensor> {
        match &self.lora {
            None => Ok(base),
            Some(lora) => Ok(base.f_add(&lora.forward(x)?)?),
        }
    }

    fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }

    fn is_frozen(&self) -> bool {
        !self.weight.requires_grad()
    }
}

/// The weight a frozen projection multiplies by: its copy in autocast's dtype while autocast
/// for its device computes in that dtype, else the weight itself (autocast would make the same
/// cast from it; the copy saves doing it again at every forward).
fn compute_weight<'a>(weight: &'a Tensor, copy: Option<&'a Tensor>) -> &'a Tensor {
    match copy {
        Some(c) if !weight.requires_grad() => {
            let device = c.device();
            if crate::autocast::autocast_enabled(device)
                && crate::autocast::autocast_kind(device) == Some(c.kind())
            {
                c
            } else {
                weight
            }
        }
        _ => weight,
    }
}

/// When the projections that read one input (q, k and v of attention; gate and up of the
/// MLP) run as one matrix product instead of one each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fusion {
    /// Never: one product per projection (the reference the fused paths are tested against).
    Off,
    /// Frozen weights only, through the buffer their variables are views of: no copy. The
    /// default on a CPU.
    Frozen,
    /// Frozen weights as above, and trained ones concatenated at every forward: one copy of
    /// those weights per forward buys three matrix products fewer per block each way (and
    /// their casts, sums and gradient additions). The default on CUDA, where a training step
    /// of this model is bound by the number of kernels it launches.
    All,
}

impl Fusion {
    /// The default for a device (see the variants).
    pub fn default_for(device: Device) -> Fusion {
        if device.is_cuda() {
            Fusion::All
        } else {
            Fusion::Frozen
        }
    }
}

/// One buffer `[sum of outs, in]` whose consecutive row blocks are the weights of
/// projections that read the same input: each projection keeps its own HF-named variable,
/// a view of its rows, so loading, saving, LoRA and the optimizer see nothing different.
#[derive(Debug)]
struct FusedWeights {
    buffer: Tensor,
    /// The buffer in autocast's dtype (see [`Linear`]'s `compute`).
    compute: Option<Tensor>,
}

impl FusedWeights {
    /// Copies the current weights of `parts` into one new buffer and makes each weight a view
    /// of its rows.
    fn new(parts: &mut [&mut Linear]) -> Result<FusedWeights> {
        let buffer = tch::no_grad(|| {
            let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
            Tensor::f_cat(&weights, 0)
        })?;
        let mut row = 0;
        for part in parts.iter_mut() {
            let rows = part.out_dim();
            part.weight.f_set_data(&buffer.f_narrow(0, row, rows)?)?;
            row += rows;
        }
        Ok(FusedWeights {
            buffer,
            compute: None,
        })
    }

    /// Whether the weights of `parts` are still the buffer's row blocks, in order: anything
    /// that gives a variable new storage (a dtype change, the optimizer's flat buffer) ends
    /// that, and the forward then falls back to separate products.
    fn backs(&self, parts: &[&Linear]) -> bool {
        let elt = self.buffer.kind().elt_size_in_bytes();
        let mut next = self.buffer.data_ptr() as usize;
        parts.iter().all(|p| {
            let w = &p.weight;
            let here = w.data_ptr() as usize == next
                && w.kind() == self.buffer.kind()
                && w.device() == self.buffer.device()
                && w.is_contiguous();
            next += w.numel() * elt;
            here
        })
    }
}

/// `x` through each of `parts` (projections of the same input, LoRA included), as one matrix
/// product where `fusion` and the weights allow: the frozen weights of `fused`'s buffer, or
/// trained weights concatenated; otherwise one product each.
fn project_together(
    x: &Tensor,
    parts: &[&Linear],
    fused: Option<&FusedWeights>,
    fusion: Fusion,
) -> Result<Vec<Tensor>> {
    let frozen = parts.iter().all(|p| p.is_frozen());
    let concatenated;
    let weight = match (fusion, fused) {
        (Fusion::Off, _) => None,
        (_, Some(f)) if frozen && f.backs(parts) => {
            Some(compute_weight(&f.buffer, f.compute.as_ref()))
        }
        (Fusion::All, _) if !frozen => {
            let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
            concatenated = Tensor::f_cat(&weights, 0)?;
            Some(&concatenated)
        }
        _ => None,
    };
    let Some(weight) = weight else {
        return parts.iter().map(|p| p.forward(x)).collect();
    };
    let outs: Vec<i64> = parts.iter().map(|p| p.out_dim()).collect();
    let products = x
        .f_linear::<&Tensor>(weight, None)?
        .f_split_with_sizes(&outs, -1)?;
    parts
        .iter()
        .zip(products)
        .map(|(p, base)| p.add_lora(x, base))
        .collect()
}

/// LoRA settings (Hu et al. 2021); the defaults are LLaRA's: rank 8, alpha 32, dropout 0.1 on
/// every projection of every block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Which projections get an adapter: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj.
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 32.0,
            dropout: 0.1,
            targets: LORA_TARGETS.iter().map(|t| (*t).to_owned()).collect(),
        }
    }
}

/// The projections LoRA can adapt, by their HF names.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `scale * B(A(dropout(x)))` with `A` `[r, in]` (Kaiming-uniform) and `B` `[out, r]` (zeros),
/// so a fresh adapter leaves the model unchanged. Named as PEFT names them
/// (`...q_proj.lora_A.weight`), in the caller's trainable store.
#[derive(Debug)]
struct Lora {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    training: Arc<AtomicBool>,
}

impl Lora {
    fn new(
        path: &nn::Path,
        out_dim: i64,
        in_dim: i64,
        config: &LoraConfig,
        training: Arc<AtomicBool>,
    ) -> Result<Lora> {
        let rank = config.rank as i64;
        // PEFT's init: kaiming_uniform(a = sqrt(5)) for A, i.e. U(-1/sqrt(in), 1/sqrt(in)).
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a = (path / "lora_A").f_var(
            "weight",
            &[rank, in_dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = (path / "lora_B").f_var("weight", &[out_dim, rank], nn::Init::Const(0.))?;
        Ok(Lora {
            a,
            b,
            scale: config.alpha / config.rank as f64,
            dropout: config.dropout,
            training,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let train = self.training.load(Ordering::Relaxed);
        let x = if train && self.dropout > 0.0 {
            x.f_dropout(self.dropout, true)?
        } else {
            x.shallow_clone()
        };
        let kind = x.kind();
        // The adapter's own dtype may differ from the base's (f32 adapters on a bf16 base).
        let a = self.a.f_to_kind(kind)?;
        let b = self.b.f_to_kind(kind)?;
        Ok(x.f_linear::<&Tensor>(&a, None)?
            .f_linear::<&Tensor>(&b, None)?
            .f_mul_scalar(self.scale)?)
    }
}

/// Root-mean-square layer norm; statistics in f32 whatever the activations' dtype (as HF).
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(path: &nn::Path, dim: usize, eps: f64) -> Result<RmsNorm> {
        let weight = path.f_var("weight", &[dim as i64], nn::Init::Const(1.))?;
        Ok(RmsNorm { weight, eps })
    }

    /// HF's LlamaRMSNorm (normalised in f32, scaled by the weight) through libtorch's
    /// `rms_norm`: the same few kernels on a CPU, one fused kernel forward and one backward on
    /// CUDA instead of six or more each way (the training step is launch-bound there).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.weight.size();
        Ok(x.f_rms_norm(width.as_slice(), Some(&self.weight), self.eps)?)
    }
}

/// Precomputed rotary tables, `[max_positions, head_dim]` in f32, gathered by position.
/// `sin` has its first half negated: `rotate_half(x) * sin` of the rotate-half form equals
/// `roll(x, half) * sin` with it, one kernel instead of a negation and a concatenation.
#[derive(Debug)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(config: &LlamaConfig, device: Device) -> Result<Rotary> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf((2 * i) as f64 / config.head_dim as f64) as f32
            })
            .collect();
        let inv_freq = Tensor::f_from_slice(&inv_freq)?.f_to_device(device)?;
        let positions =
            Tensor::f_arange(config.max_position_embeddings as i64, (Kind::Float, device))?;
        let freqs = positions.f_outer(&inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let sin = freqs.f_sin()?;
        Ok(Rotary {
            cos: emb.f_cos()?,
            sin: Tensor::f_cat(&[&sin.f_neg()?, &sin], -1)?,
        })
    }

    /// cos and sin for `positions` `[B, T]`, shaped `[B, 1, T, head_dim]` in `kind`.
    fn at(&self, positions: &Tensor, kind: Kind) -> Result<(Tensor, Tensor)> {
        let pick = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .f_index_select(0, &positions.f_flatten(0, -1)?)?
                .f_view([positions.size()[0], 1, positions.size()[1], -1])?
                .f_to_kind(kind)?)
        };
        Ok((pick(&self.cos)?, pick(&self.sin)?))
    }
}

/// HF's `x * cos + rotate_half(x) * sin`, where `rotate_half(x) = [-x2, x1]`, written as
/// `x * cos + [x2, x1] * [-sin1, sin2]` with the sign in the table ([`Rotary`]): three kernels
/// each way instead of five (the training step is launch-bound on a GPU).
fn apply_rotary(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let swapped = x.f_roll([half], [-1])?;
    Ok(x.f_mul(cos)?.f_addcmul(&swapped, signed_sin)?)
}

/// Keys and values of every layer for the tokens seen so far, `[B, n_kv_heads, S, head_dim]`,
/// plus which of those S positions are real tokens (false for padding).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[B, S]` bool; `None` while every cached position is a real token.
    key_valid: Option<Tensor>,
    len: i64,
}

impl KvCache {
    pub fn new(num_layers: usize) -> KvCache {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            key_valid: None,
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch size of the cached tensors (None while empty).
    pub fn batch_size(&self) -> Option<i64> {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.size()[0])
    }
}

/// How one layer uses the KV cache in a forward.
enum LayerCache<'a> {
    Off,
    /// Attend to the cached keys and append this chunk's.
    Append(&'a mut Option<(Tensor, Tensor)>),
    /// Attend to the cached keys, leave them as they are (packed scoring over one prompt).
    ReadOnly(Option<&'a (Tensor, Tensor)>),
}

/// Input-embedding overrides: row `vectors[i]` replaces the token embedding of sequence
/// `batch[i]` at position `position[i]` (RSLLM's ID slots carry projected item vectors).
#[derive(Debug)]
pub struct SlotOverrides {
    /// `[N]` int64
    pub batch: Tensor,
    /// `[N]` int64, positions within this forward's chunk
    pub position: Tensor,
    /// `[N, hidden_size]`, any float kind (cast to the model's)
    pub vectors: Tensor,
}

#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// The buffer q, k and v are row blocks of (see [`FusedWeights`]).
    qkv: Option<FusedWeights>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(path: &nn::Path, c: &LlamaConfig) -> Result<Attention> {
        let d = c.hidden_size;
        let mut attention = Attention {
            q_proj: Linear::new(&(path / "q_proj"), c.num_attention_heads * c.head_dim, d)?,
            k_proj: Linear::new(&(path / "k_proj"), c.num_key_value_heads * c.head_dim, d)?,
            v_proj: Linear::new(&(path / "v_proj"), c.num_key_value_heads * c.head_dim, d)?,
            o_proj: Linear::new(&(path / "o_proj"), d, c.num_attention_heads * c.head_dim)?,
            qkv: None,
            num_heads: c.num_attention_heads as i64,
            num_kv_heads: c.num_key_value_heads as i64,
            head_dim: c.head_dim as i64,
        };
        attention.fuse()?;
        Ok(attention)
    }

    fn fuse(&mut self) -> Result<()> {
        self.qkv = Some(FusedWeights::new(&mut [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
        ])?);
        Ok(())
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: LayerCache<'_>,
        fusion: Fusion,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let [q, k, v]: [Tensor; 3] = project_together(
            x,
            &[&self.q_proj, &self.k_proj, &self.v_proj],
            self.qkv.as_ref(),
            fusion,
        )?
        .try_into()
        .map_err(|_| LlmError::invalid("attention: expected three projections"))?;
        let heads = |projected: Tensor, n: i64| -> Result<Tensor> {
            Ok(projected
                .f_view([b, t, n, self.head_dim])?
                .f_transpose(1, 2)?)
        };
        let q = apply_rotary(&heads(q, self.num_heads)?, cos, sin)?;
        let mut k = apply_rotary(&heads(k, self.num_kv_heads)?, cos, sin)?;
        let mut v = heads(v, self.num_kv_heads)?;
        match cache {
            LayerCache::Append(slot) => {
                if let Some((past_k, past_v)) = slot.as_ref() {
                    k = Tensor::f_cat(&[past_k, &k], 2)?;
                    v = Tensor::f_cat(&[past_v, &v], 2)?;
                }
                // A fresh v is a view into the fused q, k, v product; the cache keeps v's own
                // copy, not the whole product alive.
                if slot.is_none() {
                    v = v.f_contiguous()?;
                }
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
            }
            LayerCache::ReadOnly(Some((past_k, past_v))) => {
                k = Tensor::f_cat(&[past_k, &k], 2)?;
                v = Tensor::f_cat(&[past_v, &v], 2)?;
            }
            LayerCache::ReadOnly(None) | LayerCache::Off => {}
        }
        // Grouped-query attention: each key/value head serves num_heads / num_kv_heads query
        // heads; libtorch's kernel does the sharing without materialising repeated keys.
        let gqa = self.num_heads != self.num_kv_heads;
        let out = match mask {
            AttentionMask::Causal => Tensor::f_scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, true, None, gqa,
            )?,
            AttentionMask::None => Tensor::f_scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, gqa,
            )?,
            AttentionMask::Explicit(m) => {
                Tensor::f_scaled_dot_product_attention(&q, &k, &v, Some(m), 0.0, false, None, gqa)?
            }
        };
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// The buffer gate and up are row blocks of (see [`FusedWeights`]).
    gate_up: Option<FusedWeights>,
}

impl Mlp {
    fn new(path: &nn::Path, c: &LlamaConfig) -> Result<Mlp> {
        let mut mlp = Mlp {
            gate_proj: Linear::new(&(path / "gate_proj"), c.intermediate_size, c.hidden_size)?,
            up_proj: Linear::new(&(path / "up_proj"), c.intermediate_size, c.hidden_size)?,
            down_proj: Linear::new(&(path / "down_proj"), c.hidden_size, c.intermediate_size)?,
            gate_up: None,
        };
        mlp.fuse()?;
        Ok(mlp)
    }

    fn fuse(&mut self) -> Result<()> {
        self.gate_up = Some(FusedWeights::new(&mut [
            &mut self.gate_proj,
            &mut self.up_proj,
        ])?);
        Ok(())
    }

    fn forward(&self, x: &Tensor, fusion: Fusion) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = project_together(
            x,
            &[&self.gate_proj, &self.up_proj],
            self.gate_up.as_ref(),
            fusion,
        )?
        .try_into()
        .map_err(|_| LlmError::invalid("MLP: expected two projections"))?;
        self.down_proj.forward(&gate.f_silu()?.f_mul(&up)?)
    }
}

#[derive(Debug)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    span: tracing::Span,
}

impl Block {
    fn new(path: &nn::Path, c: &LlamaConfig, index: usize) -> Result<Block> {
        Ok(Block {
            input_layernorm: RmsNorm::new(
                &(path / "input_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            self_attn: Attention::new(&(path / "self_attn"), c)?,
            post_attention_layernorm: RmsNorm::new(
                &(path / "post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            )?,
            mlp: Mlp::new(&(path / "mlp"), c)?,
            span: tracing::trace_span!("block", index),
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &AttentionMask,
        cache: LayerCache<'_>,
        fusion: Fusion,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            cos,
            sin,
            mask,
            cache,
            fusion,
        )?;
        let x = x.f_add(&attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, fusion)?;
        Ok(x.f_add(&mlp)?)
    }
}

/// Which keys each query may see in one forward.
#[derive(Debug)]
enum AttentionMask {
    /// Fresh causal chunk without padding: libtorch's fused causal path.
    Causal,
    /// One new token per sequence, every cached key visible.
    None,
    /// `[B, 1, T, S]` bool, true where attention is allowed.
    Explicit(Tensor),
}

/// The decoder: `model.embed_tokens`, `model.layers.*`, `model.norm` and `lm_head`.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Linear>,
    rotary: Rotary,
    device: Device,
    /// Dropout switch shared with every LoRA adapter.
    training: Arc<AtomicBool>,
    fusion: Fusion,
}

impl Llama {
    /// Declares every variable under `root` (zeros; load or initialise them afterwards).
    pub fn new(root: &nn::Path, config: &LlamaConfig) -> Result<Llama> {
        let model = root / "model";
        config.check_size()?;
        let embed_tokens = (&model / "embed_tokens").f_var(
            "weight",
            &[config.vocab_size as i64, config.hidden_size as i64],
            nn::Init::Const(0.),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| Block::new(&(&model / "layers" / i), config, i))
            .collect::<Result<_>>()?;
        let norm = RmsNorm::new(&(&model / "norm"), config.hidden_size, config.rms_norm_eps)?;
        let lm_head = (!config.tie_word_embeddings)
            .then(|| Linear::new(&(root / "lm_head"), config.vocab_size, config.hidden_size))
            .transpose()?;
        Ok(Llama {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary: Rotary::new(config, root.device())?,
            device: root.device(),
            training: Arc::new(AtomicBool::new(false)),
            fusion: Fusion::default_for(root.device()),
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Which projections run as one matrix product ([`Fusion`]; the device's default unless
    /// set).
    pub fn set_fusion(&mut self, fusion: Fusion) {
        self.fusion = fusion;
    }

    /// Makes q, k, v (and gate, up) of every block views of one buffer again, in the weights'
    /// current dtype and device. The model does this when it is built; call it again after
    /// anything that gave the variables new storage (`VarStore::set_kind`), or the frozen
    /// projections run one product each.
    pub fn fuse_projections(&mut self) -> Result<()> {
        for block in &mut self.layers {
            block.self_attn.fuse()?;
            block.mlp.fuse()?;
        }
        Ok(())
    }

    /// Drops the shared buffers, each projection keeping its own copy of its weights: for a
    /// full fine-tune, whose optimizer moves trained weights into storage of its own (the
    /// buffers would then hold stale values, unused, for as long as the model lives).
    pub fn unfuse_projections(&mut self) -> Result<()> {
        for block in &mut self.layers {
            let attn = &mut block.self_attn;
            let mlp = &mut block.mlp;
            for linear in [
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
            ] {
                let own = tch::no_grad(|| -> Result<Tensor> {
                    let mut own = linear.weight.f_empty_like()?;
                    own.f_copy_(&linear.weight)?;
                    Ok(own)
                })?;
                linear.weight.f_set_data(&own)?;
            }
            attn.qkv = None;
            mlp.gate_up = None;
        }
        Ok(())
    }

    /// Keeps a copy of every frozen projection weight in `kind`, used while autocast computes
    /// in `kind` (bf16 training of adapters over a frozen f32 base): autocast casts only
    /// weights that need gradients once per forward, and the frozen ones at every use, 210
    /// casts per forward of SmolLM2-135M. Costs the copies' memory (2 bytes per base
    /// parameter in bf16). Weights that are trained, or already in `kind`, get none; `None`
    /// drops the copies.
    pub fn keep_compute_copies(&mut self, kind: Option<Kind>) -> Result<()> {
        let copy = |w: &Tensor, frozen: bool| -> Result<Option<Tensor>> {
            Ok(match kind {
                Some(k) if frozen && w.kind() != k => Some(tch::no_grad(|| w.f_to_kind(k))?),
                _ => None,
            })
        };
        // A group whose weights are views of one buffer gets one copy of the buffer (what its
        // forward multiplies by); anything else one copy per weight.
        let group = |fused: &mut Option<FusedWeights>, parts: &mut [&mut Linear]| -> Result<()> {
            let views: Vec<&Linear> = parts.iter().map(|p| &**p).collect();
            let frozen = views.iter().all(|p| p.is_frozen());
            let backed = fused.as_ref().is_some_and(|f| f.backs(&views));
            if let Some(f) = fused.as_mut() {
                f.compute = if backed {
                    copy(&f.buffer, frozen)?
                } else {
                    None
                };
            }
            for part in parts.iter_mut() {
                part.compute = if backed {
                    None
                } else {
                    copy(&part.weight, part.is_frozen())?
                };
            }
            Ok(())
        };
        for block in &mut self.layers {
            let attn = &mut block.self_attn;
            group(
                &mut attn.qkv,
                &mut [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj],
            )?;
            attn.o_proj.compute = copy(&attn.o_proj.weight, attn.o_proj.is_frozen())?;
            let mlp = &mut block.mlp;
            group(
                &mut mlp.gate_up,
                &mut [&mut mlp.gate_proj, &mut mlp.up_proj],
            )?;
            mlp.down_proj.compute = copy(&mlp.down_proj.weight, mlp.down_proj.is_frozen())?;
        }
        Ok(())
    }

    /// Whether every block's q, k, v and gate, up are still views of their shared buffers.
    pub fn projections_fused(&self) -> bool {
        self.layers.iter().all(|b| {
            let attn = &b.self_attn;
            let mlp = &b.mlp;
            attn.qkv
                .as_ref()
                .is_some_and(|f| f.backs(&[&attn.q_proj, &attn.k_proj, &attn.v_proj]))
                && mlp
                    .gate_up
                    .as_ref()
                    .is_some_and(|f| f.backs(&[&mlp.gate_proj, &mlp.up_proj]))
        })
    }

    /// Training mode turns adapter dropout on; inference mode (the default) off.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Adds LoRA adapters to the projections `config.targets` names in every block, their
    /// variables under `root` (a separate, trainable store) with PEFT's names, e.g.
    /// `model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub fn attach_lora(&mut self, root: &nn::Path, config: &LoraConfig) -> Result<()> {
        // Written so that NaN fails too.
        let valid = config.rank > 0 && config.alpha > 0.0 && (0.0..1.0).contains(&config.dropout);
        if !valid {
            return Err(LlmError::invalid(format!(
                "LoRA rank ({}) must be positive, alpha ({}) positive, dropout ({}) in [0, 1)",
                config.rank, config.alpha, config.dropout
            )));
        }
        if let Some(bad) = config
            .targets
            .iter()
            .find(|t| !LORA_TARGETS.contains(&t.as_str()))
        {
            return Err(LlmError::invalid(format!(
                "LoRA target {bad:?} is not one of {LORA_TARGETS:?}"
            )));
        }
        let wants = |name: &str| config.targets.iter().any(|t| t == name);
        for (i, block) in self.layers.iter_mut().enumerate() {
            let layer = root / "model" / "layers" / i;
            let attn = &layer / "self_attn";
            let mlp = &layer / "mlp";
            let sites: [(&str, &nn::Path, &mut Linear); 7] = [
                ("q_proj", &attn, &mut block.self_attn.q_proj),
                ("k_proj", &attn, &mut block.self_attn.k_proj),
                ("v_proj", &attn, &mut block.self_attn.v_proj),
                ("o_proj", &attn, &mut block.self_attn.o_proj),
                ("gate_proj", &mlp, &mut block.mlp.gate_proj),
                ("up_proj", &mlp, &mut block.mlp.up_proj),
                ("down_proj", &mlp, &mut block.mlp.down_proj),
            ];
            for (name, parent, linear) in sites {
                if !wants(name) {
                    continue;
                }
                let size = linear.weight.size();
                linear.lora = Some(Lora::new(
                    &(parent / name),
                    size[0],
                    size[1],
                    config,
                    self.training.clone(),
                )?);
            }
        }
        Ok(())
    }

    /// The dtype activations run in (that of the embedding table).
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// The input embedding table `[vocab, hidden]` (RSLLM's L_ui uses title-token means).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Token embeddings `[B, T, D]` for `ids` `[B, T]` (int64), with `overrides` spliced in.
    pub fn embed(&self, ids: &Tensor, overrides: Option<&SlotOverrides>) -> Result<Tensor> {
        let vocab = self.config.vocab_size as i64;
        if ids.numel() > 0 {
            let (min, max) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
            if min < 0 || max >= vocab {
                return Err(LlmError::invalid(format!(
                    "token id out of range: ids span {min}..={max}, vocabulary has {vocab}"
                )));
            }
        }
        let embeds = Tensor::f_embedding(&self.embed_tokens, ids, -1, false, false)?;
        match overrides {
            None => Ok(embeds),
            Some(o) => self.splice(embeds, o),
        }
    }

    fn splice(&self, embeds: Tensor, o: &SlotOverrides) -> Result<Tensor> {
        let (b, t, d) = {
            let s = embeds.size();
            (s[0], s[1], s[2])
        };
        let n = o.batch.size().first().copied().unwrap_or(0);
        if o.position.size() != [n] || o.batch.size() != [n] || o.vectors.size() != [n, d] {
            return Err(LlmError::invalid(format!(
                "slot overrides: batch {:?}, position {:?} and vectors {:?} must be [N], [N], [N, {d}]",
                o.batch.size(),
                o.position.size(),
                o.vectors.size()
            )));
        }
        if n == 0 {
            return Ok(embeds);
        }
        let in_range = |x: &Tensor, bound: i64| -> Result<bool> {
            Ok(x.f_min()?.int64_value(&[]) >= 0 && x.f_max()?.int64_value(&[]) < bound)
        };
        if !in_range(&o.batch, b)? || !in_range(&o.position, t)? {
            return Err(LlmError::invalid(format!(
                "slot overrides point outside the [{b}, {t}] prompt batch"
            )));
        }
        let vectors = o.vectors.f_to_kind(embeds.kind())?;
        // Out of place, so gradients flow into the vectors (the projector) when training.
        Ok(embeds.f_index_put(&[Some(&o.batch), Some(&o.position)], &vectors, false)?)
    }

    /// Runs the decoder on `embeds` `[B, T, D]` at absolute `positions` `[B, T]` (int64).
    /// `valid` `[B, T]` (bool) marks real tokens (false: padding, never attended to). With a
    /// cache, keys/values are appended and the new tokens also see the cached ones.
    /// Returns the final-norm hidden states `[B, T, D]`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        valid: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let size = embeds.size();
        let [b, t, d] = size[..] else {
            return Err(LlmError::invalid(format!(
                "embeddings must be [B, T, D], got {size:?}"
            )));
        };
        if d != self.config.hidden_size as i64 || positions.size() != [b, t] {
            return Err(LlmError::invalid(format!(
                "embeddings {size:?} and positions {:?} do not fit hidden size {}",
                positions.size(),
                self.config.hidden_size
            )));
        }
        if t == 0 {
            return Err(LlmError::invalid("an empty chunk has nothing to run"));
        }
        self.check_positions(positions)?;
        let past = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = cache.as_ref()
            && c.batch_size().is_some_and(|cb| cb != b)
        {
            return Err(LlmError::invalid(format!(
                "batch of {b} sequences does not match the cache's {:?}",
                c.batch_size()
            )));
        }
        // Which of the past + t keys are real tokens (None: all of them).
        let key_valid = match (cache.as_ref().and_then(|c| c.key_valid.as_ref()), valid) {
            (None, None) => None,
            (old, new) => {
                let old = match old {
                    Some(o) => o.shallow_clone(),
                    None => Tensor::f_ones([b, past], (Kind::Bool, self.device))?,
                };
                let new = match new {
                    Some(n) => n.f_to_kind(Kind::Bool)?,
                    None => Tensor::f_ones([b, t], (Kind::Bool, self.device))?,
                };
                Some(Tensor::f_cat(&[&old, &new], 1)?)
            }
        };
        let mask = self.mask(b, t, past, key_valid.as_ref())?;
        let (cos, sin) = self.rotary.at(positions, embeds.kind())?;
        let mut x = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = match cache.as_deref_mut().and_then(|c| c.layers.get_mut(i)) {
                Some(slot) => LayerCache::Append(slot),
                None => LayerCache::Off,
            };
            x = layer.forward(&x, &cos, &sin, &mask, slot, self.fusion)?;
        }
        if let Some(c) = cache {
            c.key_valid = key_valid;
            c.len += t;
        }
        self.norm.forward(&x)
    }

    /// Runs the decoder under a caller-built attention mask `[B, 1, T, P + T]` (bool, true
    /// where a query row may attend to a key column; every row must allow at least its own
    /// position), after the `P` positions of `prefix` if given. The prefix cache is read,
    /// never extended. Packed sequences use it: several continuations of one prompt in one
    /// row, each seeing the prompt and its own earlier tokens only.
    pub fn forward_masked(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        prefix: Option<&KvCache>,
    ) -> Result<Tensor> {
        let size = embeds.size();
        let [b, t, d] = size[..] else {
            return Err(LlmError::invalid(format!(
                "embeddings must be [B, T, D], got {size:?}"
            )));
        };
        let past = prefix.map_or(0, |c| c.len);
        if prefix.is_some_and(|c| c.key_valid.is_some() || c.batch_size().is_some_and(|cb| cb != b))
        {
            return Err(LlmError::invalid(
                "a prefix cache for a masked forward must hold unpadded rows of the same batch",
            ));
        }
        if d != self.config.hidden_size as i64
            || positions.size() != [b, t]
            || mask.size() != [b, 1, t, past + t]
        {
            return Err(LlmError::invalid(format!(
                "embeddings {size:?}, positions {:?} and mask {:?} do not fit [B, T, {}], [B, T], [B, 1, T, {past} + T]",
                positions.size(),
                mask.size(),
                self.config.hidden_size
            )));
        }
        self.check_positions(positions)?;
        let mask = AttentionMask::Explicit(mask.f_to_kind(Kind::Bool)?);
        let (cos, sin) = self.rotary.at(positions, embeds.kind())?;
        let mut x = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = prefix
                .and_then(|c| c.layers.get(i))
                .and_then(Option::as_ref);
            x = layer.forward(
                &x,
                &cos,
                &sin,
                &mask,
                LayerCache::ReadOnly(past_kv),
                self.fusion,
            )?;
        }
        self.norm.forward(&x)
    }

    fn check_positions(&self, positions: &Tensor) -> Result<()> {
        let max_pos = positions.f_max()?.int64_value(&[]);
        if positions.f_min()?.int64_value(&[]) < 0
            || max_pos >= self.config.max_position_embeddings as i64
        {
            return Err(LlmError::invalid(format!(
                "positions reach {max_pos}; the model's context is {} tokens",
                self.config.max_position_embeddings
            )));
        }
        Ok(())
    }

    fn mask(&self, b: i64, t: i64, past: i64, key_valid: Option<&Tensor>) -> Result<AttentionMask> {
        if key_valid.is_none() {
            if past == 0 {
                return Ok(AttentionMask::Causal);
            }
            if t == 1 {
                return Ok(AttentionMask::None);
            }
        }
        let s = past + t;
        // Query i sits at cache index past + i and sees keys 0..=past + i.
        let q_idx = Tensor::f_arange(t, (Kind::Int64, self.device))?.f_add_scalar(past)?;
        let k_idx = Tensor::f_arange(s, (Kind::Int64, self.device))?;
        let causal = k_idx.f_unsqueeze(0)?.f_le_tensor(&q_idx.f_unsqueeze(1)?)?; // [T, S]
        let mut mask = causal.f_view([1, 1, t, s])?.f_expand([b, 1, t, s], false)?;
        if let Some(kv) = key_valid {
            mask = mask.f_logical_and(&kv.f_view([b, 1, 1, s])?)?;
            // A padding query that sees no key at all would give NaN rows; let it see
            // itself (its output is never used).
            let own = Tensor::f_eye_m(t, s, (Kind::Bool, self.device))?;
            let own = own.f_roll([past], [1])?.f_view([1, 1, t, s])?;
            mask = mask.f_logical_or(&own)?;
        }
        Ok(AttentionMask::Explicit(mask))
    }

    /// Logits `[N, vocab]` (f32) of `hidden` `[B, T, D]` at (batch, position) pairs; pass
    /// `None` positions for every position of every sequence.
    pub fn logits_at(&self, hidden: &Tensor, at: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        let picked = match at {
            Some((batch, position)) => hidden.f_index(&[Some(batch), Some(position)])?,
            None => hidden.f_flatten(0, 1)?,
        };
        self.head(&picked)
    }

    /// Logits at the last position of each sequence `[B, vocab]` (f32).
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.size()[1];
        self.head(&hidden.f_select(1, t - 1)?)
    }

    /// The output head on hidden rows `[.., D]`, returning f32 logits.
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => hidden.f_linear::<&Tensor>(&self.embed_tokens, None)?,
        };
        Ok(logits.f_to_kind(Kind::Float)?)
    }

    /// Ids to hidden states, positions 0..T, no padding: the plain full forward.
    pub fn forward_ids(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        let (b, t) = (ids.size()[0], ids.size()[1]);
        let positions = Tensor::f_arange(t, (Kind::Int64, self.device))?
            .f_add_scalar(past)?
            .f_unsqueeze(0)?
            .f_expand([b, t], false)?;
        let embeds = self.embed(ids, None)?;
        self.forward_embeds(&embeds, &positions, None, cache)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 97,
            hidden_size: 32,
            intermediate_size: 48,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// A tiny model with seeded random weights.
    pub(crate) fn tiny_model(config: &LlamaConfig) -> (nn::VarStore, Llama) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::new(&vs.root(), config).unwrap();
        tch::no_grad(|| {
            for (name, mut var) in vs.variables() {
                let fresh = if name.ends_with("norm.weight") {
                    Tensor::ones(var.size(), (Kind::Float, Device::Cpu))
                        + Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.1
                } else {
                    Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.2
                };
                var.copy_(&fresh);
            }
        });
        (vs, model)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn variable_names_match_hugging_face() {
        let _rng = crate::test_rng_lock();
        let (vs, _) = tiny_model(&tiny_config());
        let names = vs.variables();
        for name in [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(names.contains_key(name), "missing {name}");
        }
        assert!(
            !names.contains_key("lm_head.weight"),
            "tied head has no variable"
        );
        assert_eq!(
            names["model.layers.0.self_attn.k_proj.weight"].size(),
            [16, 32]
        );
        let params: i64 = names.values().map(|t| t.numel() as i64).sum();
        assert_eq!(params as usize, tiny_config().num_parameters());
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(&[5i64, 9, 13, 21, 34, 55]).view([1, 6]);
        let changed = Tensor::from_slice(&[5i64, 9, 13, 80, 81, 82]).view([1, 6]);
        let a = model.forward_ids(&ids, None).unwrap();
        let b = model.forward_ids(&changed, None).unwrap();
        // Positions 0..3 see the same prefix: identical; position 3 onwards differ.
        assert!(max_abs_diff(&a.narrow(1, 0, 3), &b.narrow(1, 0, 3)) < 1e-6);
        assert!(max_abs_diff(&a.narrow(1, 3, 1), &b.narrow(1, 3, 1)) > 1e-3);
    }

    #[test]
    fn incremental_decoding_equals_the_full_forward() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 10, 11, 12, 13]).view([2, 6]);
        let full = model.forward_ids(&ids, None).unwrap();
        let mut cache = KvCache::new(c.num_hidden_layers);
        // A 3-token prefill, then one token at a time.
        let mut pieces = vec![
            model
                .forward_ids(&ids.narrow(1, 0, 3), Some(&mut cache))
                .unwrap(),
        ];
        for i in 3..6 {
            pieces.push(
                model
                    .forward_ids(&ids.narrow(1, i, 1), Some(&mut cache))
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 6);
        let stepped = Tensor::cat(&pieces, 1);
        assert!(
            max_abs_diff(&full, &stepped) < 1e-5,
            "{}",
            max_abs_diff(&full, &stepped)
        );
        // A 2-token chunk after a cached prefix takes the explicit-mask path: same answer.
        let mut cache = KvCache::new(c.num_hidden_layers);
        let a = model
            .forward_ids(&ids.narrow(1, 0, 4), Some(&mut cache))
            .unwrap();
        let b = model
            .forward_ids(&ids.narrow(1, 4, 2), Some(&mut cache))
            .unwrap();
        assert!(max_abs_diff(&full, &Tensor::cat(&[a, b], 1)) < 1e-5);
    }

    #[test]
    fn left_padding_does_not_change_the_real_tokens() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let _g = tch::no_grad_guard();
        let alone = model
            .forward_ids(&Tensor::from_slice(&[7i64, 8, 9]).view([1, 3]), None)
            .unwrap();
        // The same sequence left-padded by two (pad id 0) with positions starting at 0 on the
        // first real token.
        let ids = Tensor::from_slice(&[0i64, 0, 7, 8, 9]).view([1, 5]);
        let positions = Tensor::from_slice(&[0i64, 0, 0, 1, 2]).view([1, 5]);
        let valid = Tensor::from_slice(&[false, false, true, true, true]).view([1, 5]);
        let embeds = model.embed(&ids, None).unwrap();
        let padded = model
            .forward_embeds(&embeds, &positions, Some(&valid), None)
            .unwrap();
        let diff = max_abs_diff(&alone, &padded.narrow(1, 2, 3));
        assert!(diff < 1e-5, "{diff}");
        assert!(
            !bool::try_from(padded.isnan().any()).unwrap(),
            "padding rows must not be NaN"
        );
    }

    #[test]
    fn overrides_replace_exactly_the_named_slots() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9]).view([2, 3]);
        let vectors = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
        let overrides = SlotOverrides {
            batch: Tensor::from_slice(&[0i64, 1]),
            position: Tensor::from_slice(&[1i64, 2]),
            vectors: vectors.shallow_clone(),
        };
        let plain = model.embed(&ids, None).unwrap();
        let spliced = model.embed(&ids, Some(&overrides)).unwrap();
        assert!(max_abs_diff(&spliced.get(0).get(1), &vectors.get(0)) < 1e-7);
        assert!(max_abs_diff(&spliced.get(1).get(2), &vectors.get(1)) < 1e-7);
        assert!(max_abs_diff(&spliced.get(0).get(0), &plain.get(0).get(0)) < 1e-7);
        assert!(max_abs_diff(&spliced.get(1).get(1), &plain.get(1).get(1)) < 1e-7);
        // Out of range: an error naming the problem, not a panic.
        let bad = SlotOverrides {
            batch: Tensor::from_slice(&[0i64]),
            position: Tensor::from_slice(&[3i64]),
            vectors: Tensor::zeros([1, 32], (Kind::Float, Device::Cpu)),
        };
        let err = model.embed(&ids, Some(&bad)).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        let err = model
            .embed(&Tensor::from_slice(&[97i64]).view([1, 1]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn gradients_reach_override_vectors() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let vectors = Tensor::randn([1, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let overrides = SlotOverrides {
            batch: Tensor::from_slice(&[0i64]),
            position: Tensor::from_slice(&[1i64]),
            vectors: vectors.shallow_clone(),
        };
        let ids = Tensor::from_slice(&[4i64, 5, 6]).view([1, 3]);
        let embeds = model.embed(&ids, Some(&overrides)).unwrap();
        let positions = Tensor::arange(3, (Kind::Int64, Device::Cpu)).view([1, 3]);
        let hidden = model
            .forward_embeds(&embeds, &positions, None, None)
            .unwrap();
        let logits = model.last_logits(&hidden).unwrap();
        logits.sum(Kind::Float).backward();
        let grad = vectors.grad();
        assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn lora_starts_as_identity_and_trains_only_its_adapters() {
        let _rng = crate::test_rng_lock();
        use tch::nn::OptimizerConfig;
        let c = tiny_config();
        let (mut base_vs, mut model) = tiny_model(&c);
        base_vs.freeze();
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9]).view([1, 6]);
        let before = tch::no_grad(|| model.forward_ids(&ids, None).unwrap());
        let lora_vs = nn::VarStore::new(Device::Cpu);
        model
            .attach_lora(&lora_vs.root(), &LoraConfig::default())
            .unwrap();
        let names = lora_vs.variables();
        assert_eq!(names.len(), 2 * 7 * c.num_hidden_layers);
        assert_eq!(
            names["model.layers.1.mlp.down_proj.lora_A.weight"].size(),
            [8, 48]
        );
        assert_eq!(
            names["model.layers.0.self_attn.k_proj.lora_B.weight"].size(),
            [16, 8]
        );
        let after = tch::no_grad(|| model.forward_ids(&ids, None).unwrap());
        // Rounding only: with an adapter, q, k, v are sums in their own memory rather than
        // views of the fused product, and the attention kernel reads them in another layout.
        let diff = max_abs_diff(&before, &after);
        assert!(
            diff < 1e-5,
            "B = 0: a fresh adapter changes nothing ({diff})"
        );

        // Next-token loss on a fixed sequence falls while the base weights stay put.
        let base_before = base_vs.variables()["model.layers.0.self_attn.q_proj.weight"].copy();
        let mut opt = nn::Adam::default().build(&lora_vs, 1e-2).unwrap();
        model.set_training(true);
        let loss = |m: &Llama| {
            let hidden = m.forward_ids(&ids.narrow(1, 0, 5), None).unwrap();
            let logits = m.logits_at(&hidden, None).unwrap();
            logits.cross_entropy_for_logits(&ids.narrow(1, 1, 5).reshape([-1]))
        };
        let first = loss(&model).double_value(&[]);
        for _ in 0..30 {
            opt.backward_step(&loss(&model));
        }
        model.set_training(false);
        let last = loss(&model).double_value(&[]);
        assert!(last < first * 0.5, "loss {first} -> {last}");
        let base_after = &base_vs.variables()["model.layers.0.self_attn.q_proj.weight"];
        assert!(
            base_before.equal(base_after),
            "the frozen base must not move"
        );
        let bad = LoraConfig {
            targets: vec!["wq".into()],
            ..LoraConfig::default()
        };
        let err = model
            .attach_lora(&lora_vs.root(), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wq"), "{err}");
    }

    /// Logits of every position of `ids` under `fusion`.
    fn logits_with(model: &mut Llama, fusion: Fusion, ids: &Tensor) -> Tensor {
        model.set_fusion(fusion);
        let hidden = model.forward_ids(ids, None).unwrap();
        model.logits_at(&hidden, None).unwrap()
    }

    #[test]
    fn fused_projections_are_views_that_loading_writes_through() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (vs, model) = tiny_model(&c);
        assert!(model.projections_fused());
        let vars = vs.variables();
        let q = &vars["model.layers.0.self_attn.q_proj.weight"];
        let k = &vars["model.layers.0.self_attn.k_proj.weight"];
        let qkv = &model.layers[0].self_attn.qkv.as_ref().unwrap().buffer;
        assert_eq!(qkv.size(), [32 + 16 + 16, 32]);
        // tiny_model wrote its random values into the variables: they are in the buffer.
        assert!(qkv.narrow(0, 0, 32).equal(q));
        assert!(qkv.narrow(0, 32, 16).equal(k));
        let up = &vars["model.layers.1.mlp.up_proj.weight"];
        let gate_up = &model.layers[1].mlp.gate_up.as_ref().unwrap().buffer;
        assert!(gate_up.narrow(0, 48, 48).equal(up));
    }

    #[test]
    fn fused_projections_give_the_separate_products() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (mut vs, mut model) = tiny_model(&c);
        vs.freeze();
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9, 10, 11]).view([2, 4]);
        let _g = tch::no_grad_guard();
        let fused = logits_with(&mut model, Fusion::Frozen, &ids);
        let separate = logits_with(&mut model, Fusion::Off, &ids);
        let diff = max_abs_diff(&fused, &separate);
        assert!(diff < 1e-5, "{diff}");
        assert!(
            fused.abs().max().double_value(&[]) > 0.1,
            "logits must not be trivial"
        );

        // With adapters whose B is not zero, on every projection.
        let lora_vs = nn::VarStore::new(Device::Cpu);
        model
            .attach_lora(&lora_vs.root(), &LoraConfig::default())
            .unwrap();
        for (name, mut var) in lora_vs.variables() {
            if name.contains("lora_B") {
                var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
        let fused_lora = logits_with(&mut model, Fusion::Frozen, &ids);
        let separate_lora = logits_with(&mut model, Fusion::Off, &ids);
        let diff = max_abs_diff(&fused_lora, &separate_lora);
        assert!(diff < 1e-5, "{diff}");
        assert!(
            max_abs_diff(&fused_lora, &fused) > 1e-3,
            "the adapters must matter here"
        );
    }

    #[test]
    fn trained_weights_concatenated_get_the_same_gradients() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (vs, mut model) = tiny_model(&c);
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9]).view([1, 6]);
        let grads = |model: &mut Llama, fusion: Fusion| -> Vec<Tensor> {
            vs.trainable_variables()
                .iter_mut()
                .for_each(|t| t.zero_grad());
            let logits = logits_with(model, fusion, &ids.narrow(1, 0, 5));
            let loss = logits.cross_entropy_for_logits(&ids.narrow(1, 1, 5).reshape([-1]));
            loss.backward();
            let vars = vs.variables();
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.1.self_attn.v_proj.weight",
                "model.layers.0.mlp.up_proj.weight",
                "model.embed_tokens.weight",
            ]
            .iter()
            .map(|n| vars[*n].grad().copy())
            .collect()
        };
        let concatenated = grads(&mut model, Fusion::All);
        let separate = grads(&mut model, Fusion::Off);
        for (a, b) in concatenated.iter().zip(&separate) {
            assert!(b.abs().max().double_value(&[]) > 1e-4);
            let diff = max_abs_diff(a, b);
            assert!(diff < 1e-5, "{diff}");
        }
        // Frozen-only fusion leaves trained weights to separate products: same gradients.
        let frozen_only = grads(&mut model, Fusion::Frozen);
        assert!(max_abs_diff(&frozen_only[0], &separate[0]) < 1e-6);
    }

    #[test]
    fn a_dtype_change_unfuses_until_fused_again() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (mut vs, mut model) = tiny_model(&c);
        vs.freeze();
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7]).view([1, 4]);
        let _g = tch::no_grad_guard();
        vs.set_kind(Kind::BFloat16);
        assert!(
            !model.projections_fused(),
            "new storage: the buffer no longer backs them"
        );
        // Still correct, one product each.
        let separate = logits_with(&mut model, Fusion::Frozen, &ids);
        model.fuse_projections().unwrap();
        assert!(model.projections_fused());
        assert_eq!(
            model.layers[0]
                .self_attn
                .qkv
                .as_ref()
                .unwrap()
                .buffer
                .kind(),
            Kind::BFloat16
        );
        let fused = logits_with(&mut model, Fusion::Frozen, &ids);
        let diff = max_abs_diff(&fused, &separate);
        assert!(diff < 0.05, "{diff}");
    }

    #[test]
    fn unfused_projections_own_their_weights_and_compute_the_same() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (vs, mut model) = tiny_model(&c);
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7]).view([1, 4]);
        let _g = tch::no_grad_guard();
        let fused = logits_with(&mut model, Fusion::Frozen, &ids);
        let buffer = model.layers[0]
            .self_attn
            .qkv
            .as_ref()
            .unwrap()
            .buffer
            .data_ptr();
        model.unfuse_projections().unwrap();
        assert!(!model.projections_fused());
        let q = &vs.variables()["model.layers.0.self_attn.q_proj.weight"];
        assert_ne!(q.data_ptr(), buffer, "q has storage of its own");
        let separate = logits_with(&mut model, Fusion::All, &ids);
        assert!(max_abs_diff(&fused, &separate) < 1e-5);
    }

    #[test]
    fn compute_copies_are_made_for_frozen_weights_only() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (mut vs, mut model) = tiny_model(&c);
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7]).view([1, 4]);
        let copies = |m: &Llama| -> usize {
            m.layers
                .iter()
                .map(|b| {
                    let a = &b.self_attn;
                    let linears = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]
                        .into_iter()
                        .chain([&b.mlp.gate_proj, &b.mlp.up_proj, &b.mlp.down_proj])
                        .filter(|l| l.compute.is_some())
                        .count();
                    let fused = [a.qkv.as_ref(), b.mlp.gate_up.as_ref()]
                        .into_iter()
                        .flatten()
                        .filter(|f| f.compute.is_some())
                        .count();
                    linears + fused
                })
                .sum()
        };
        // Trained weights (a full fine-tune): none.
        model.keep_compute_copies(Some(Kind::BFloat16)).unwrap();
        assert_eq!(copies(&model), 0);
        vs.freeze();
        let before = tch::no_grad(|| logits_with(&mut model, Fusion::Frozen, &ids));
        model.keep_compute_copies(Some(Kind::BFloat16)).unwrap();
        // Per block: the q, k, v buffer, the gate, up buffer, o_proj and down_proj.
        assert_eq!(copies(&model), 4 * c.num_hidden_layers);
        let copy = model.layers[0].mlp.gate_up.as_ref().unwrap();
        let compute = copy.compute.as_ref().unwrap();
        assert_eq!(compute.kind(), Kind::BFloat16);
        assert!(compute.equal(&copy.buffer.to_kind(Kind::BFloat16)));
        // Outside CUDA autocast the copies are not used: the same f32 logits.
        let after = tch::no_grad(|| logits_with(&mut model, Fusion::Frozen, &ids));
        assert!(before.equal(&after));
        model.keep_compute_copies(None).unwrap();
        assert_eq!(copies(&model), 0);
    }

    #[test]
    fn logits_only_where_asked() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let _g = tch::no_grad_guard();
        let ids = Tensor::from_slice(&[4i64, 5, 6, 7, 8, 9]).view([2, 3]);
        let hidden = model.forward_ids(&ids, None).unwrap();
        let all = model.logits_at(&hidden, None).unwrap();
        assert_eq!(all.size(), [6, 97]);
        let some = model
            .logits_at(
                &hidden,
                Some((&Tensor::from_slice(&[1i64]), &Tensor::from_slice(&[2i64]))),
            )
            .unwrap();
        assert_eq!(some.size(), [1, 97]);
        assert!(max_abs_diff(&some.get(0), &all.get(5)) < 1e-6);
        let last = model.last_logits(&hidden).unwrap();
        assert!(max_abs_diff(&last.get(0), &all.get(2)) < 1e-6);
    }
}
