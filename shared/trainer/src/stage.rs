//! One RSLLM stage on a prepared dataset, end to end: the base model with LoRA adapters, the
//! projector and heads, the recommender's item vectors (stage 2), training rows turned into
//! prompts with freshly drawn candidates, the stage loop, and the written artefacts.
//!
//! Stage 1 trains on text-only prompts, stage 2 on unified Text-ID prompts, continuing from
//! stage 1's trained tensors when `init_from` names its output (METHOD.md, "Two stages").
//! The `stage.json` beside the checkpoints records the spec, so evaluation can rebuild the
//! exact model.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rsllm_core::dataset::candidates::draw_candidates;
use rsllm_core::{Catalog, ItemId, SeqExample};
use rsllm_llm::{LlmTokenizer, LoadedModel, LoraConfig};
use rsllm_prompt::{
    BuiltPrompt, PromptBuilder, PromptMode, PromptOptions, TemplateChoice, TextEncoder,
};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::checkpoint::{self, CheckpointManifest};
use crate::error::{Result, TrainError};
use crate::objective::{ItemTable, RsllmHeads};
use crate::train_loop::{ExampleSource, StepReport, TrainConfig, TrainSummary, Trainee, train};
use crate::warm_heads::{self, StageSide};
use crate::warmup::{WarmupConfig, warm_up_projector};

/// Everything a stage needs to be run again or evaluated: written to `<out>/stage.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpec {
    /// 1: text-only prompts; 2: unified Text-ID prompts.
    pub stage: u8,
    /// Dataset name (`movielens`, ...) the prompts' templates and catalog belong to.
    pub dataset: String,
    /// The base model (GGUF file or HF directory) and its sha256.
    pub base_model: PathBuf,
    pub base_model_sha256: String,
    /// Recommender artefact directory whose item vectors fill the ID slots (stage 2).
    pub recommender: Option<PathBuf>,
    /// A previous stage's output directory to start from (stage 1 for stage 2).
    pub init_from: Option<PathBuf>,
    /// Training rows used (N of the split's training rows, chosen by `train_subset`; all when
    /// None).
    pub train_limit: Option<usize>,
    /// Which rows `train_limit` keeps; stage files written before it existed mean `first`.
    #[serde(default)]
    pub train_subset: TrainSubset,
    /// Candidates per training prompt, the target included (LLaRA: 20).
    pub num_candidates: usize,
    pub lora: LoraConfig,
    pub train: TrainConfig,
    /// Stage 2 with text-only prompts: the "without ID slots" ablation. No slot enters the
    /// prompt, so nothing of the recommender does: L_it (which aligns slots with titles) is
    /// not computed and L_ui's item side is the titles' alone (`W_v t_i`, as in stage 1).
    #[serde(default)]
    pub no_id_slots: bool,
    /// Stage 2 with ID-only prompts (slots, no titles): the "without titles" ablation.
    #[serde(default)]
    pub no_titles: bool,
    /// Stage 1 on a mixture of domains (METHOD.md, "Two stages"): the training rows of these
    /// datasets join the target's, each as text-only prompts in its own domain's templates
    /// and titles, shuffled together (`train_limit` applies to each). Empty: the target alone.
    #[serde(default)]
    pub mixture: Vec<String>,
    /// Stage 2 with a user slot after the history, filled with the recommender's user state
    /// (`PromptMode::UnifiedWithUser`; our choice beyond METHOD.md, the `user-slot` variant).
    #[serde(default)]
    pub user_slot: bool,
    /// With `user_slot`: the user slot as the prompt's last token instead of after the history
    /// (`PromptMode::UnifiedWithUserLast`, the `user-slot-last` variant).
    #[serde(default)]
    pub user_slot_last: bool,
    /// Stage 2: steps of projector warm-up before the first training step (our choice beyond
    /// METHOD.md; see [`crate::warmup`]). 0: none, the method as written.
    #[serde(default)]
    pub projector_warmup_steps: u64,
    /// Stage 2: start the projector and heads from a transport probe's (`rsllm probe-transport
    /// --save-heads`; ours, see [`crate::warm_heads`]) instead of random values or stage 1's.
    #[serde(default)]
    pub heads_from: Option<PathBuf>,
    /// With `heads_from`: keep that projector and those heads as they are, so only the
    /// adapters train (L_ui then teaches them to keep `h` readable by the warm heads).
    #[serde(default)]
    pub freeze_warm_heads: bool,
}

impl StageSpec {
    pub fn prompt_mode(&self) -> PromptMode {
        match (self.stage >= 2, self.no_id_slots, self.no_titles) {
            (false, _, _) | (true, true, _) => PromptMode::TextOnly,
            (true, false, true) => PromptMode::IdOnly,
            (true, false, false) if self.user_slot && self.user_slot_last => {
                PromptMode::UnifiedWithUserLast
            }
            (true, false, false) if self.user_slot => PromptMode::UnifiedWithUser,
            (true, false, false) => PromptMode::Unified,
        }
    }

    /// Settings that cannot go together, named.
    fn check_combination(&self) -> Result<()> {
        if self.user_slot && (self.stage < 2 || self.no_id_slots || self.no_titles) {
            return Err(TrainError::Invalid(format!(
                "user_slot is a stage-2 unified-prompt setting: not with stage {}{}{}",
                self.stage,
                if self.no_id_slots {
                    ", no_id_slots"
                } else {
                    ""
                },
                if self.no_titles { ", no_titles" } else { "" },
            )));
        }
        if self.user_slot_last && !self.user_slot {
            return Err(TrainError::Invalid(
                "user_slot_last places the user slot: it needs user_slot".into(),
            ));
        }
        if self.projector_warmup_steps > 0 && (self.stage < 2 || self.no_id_slots) {
            return Err(TrainError::Invalid(format!(
                "projector_warmup_steps warms up the ID slots' projector: not with stage {}{}",
                self.stage,
                if self.no_id_slots {
                    ", no_id_slots"
                } else {
                    ""
                },
            )));
        }
        if let Some(dir) = &self.heads_from {
            if self.stage < 2 || self.no_id_slots {
                return Err(TrainError::Invalid(format!(
                    "heads_from {} starts the ID slots' projector and the heads of a stage-2 run: not with stage {}{}",
                    dir.display(),
                    self.stage,
                    if self.no_id_slots {
                        ", no_id_slots"
                    } else {
                        ""
                    },
                )));
            }
            if self.projector_warmup_steps > 0 {
                return Err(TrainError::Invalid(format!(
                    "heads_from {} and projector_warmup_steps both set the projector: choose one",
                    dir.display()
                )));
            }
        } else if self.freeze_warm_heads {
            return Err(TrainError::Invalid(
                "freeze_warm_heads keeps the heads heads_from gives: it needs heads_from".into(),
            ));
        }
        Ok(())
    }
}

pub const SPEC_FILE: &str = "stage.json";
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// The projector warm-up's report ([`crate::warmup::WarmupReport`]), beside `stage.json`.
pub const WARMUP_FILE: &str = "projector-warmup.json";

/// The trainable side built over a loaded base model.
pub struct Rsllm {
    pub trained: nn::VarStore,
    pub heads: RsllmHeads,
    pub items: ItemTable,
    pub recommender_version: Option<String>,
}

/// Attaches LoRA, builds projector and heads, loads the recommender's item vectors (a zero
/// table when the stage has none: text-only prompts never read it) and the title tokens.
/// The new tensors' initial values come from the stage's seed.
pub fn build_rsllm(base: &mut LoadedModel, spec: &StageSpec, catalog: &Catalog) -> Result<Rsllm> {
    spec.check_combination()?;
    let device = base.model.device();
    let trained = nn::VarStore::new(device);
    // libtorch seeds its default generator from the OS in each process: without this, LoRA's
    // A, the projector and the heads would start differently in every run of the same spec.
    tch::manual_seed(spec.train.seed as i64);
    base.model.attach_lora(&trained.root(), &spec.lora)?;
    if spec.train.full_finetune {
        // The optimizer gives every trained weight storage of its own.
        base.model.unfuse_projections()?;
    } else if spec.train.autocast_bf16 && device.is_cuda() {
        // The base stays frozen: keep its bf16 copy instead of casting it at every forward
        // (one kernel launch each; on a CPU with native bf16 the casts cost no measurable time,
        // docs/results.md, and the copy would only take memory).
        base.model.keep_compute_copies(Some(Kind::BFloat16))?;
    }
    if spec.user_slot && spec.recommender.is_none() {
        return Err(TrainError::Invalid(
            "user_slot needs the recommender whose user states fill the slot".into(),
        ));
    }
    let (items, version) = item_table(base, catalog, spec.recommender.as_deref(), spec.user_slot)?;
    let heads = RsllmHeads::new(&trained.root(), items.dim(), base.model.config.hidden_size);
    Ok(Rsllm {
        trained,
        heads,
        items,
        recommender_version: version,
    })
}

/// The frozen side of the catalog's items on `base`'s device: the recommender's item vectors
/// from `recommender` (a zero table of width 64 without one: text-only prompts never read it)
/// and each title's tokens. Also returns the recommender's version; the table keeps the
/// recommender itself when `keep_recommender` (user states need it).
pub fn item_table(
    base: &LoadedModel,
    catalog: &Catalog,
    recommender: Option<&Path>,
    keep_recommender: bool,
) -> Result<(ItemTable, Option<String>)> {
    let device = base.model.device();
    let mut kept = None;
    let (vectors, version) = match recommender {
        Some(dir) => {
            let rec = rsllm_recommender::RecModel::load(dir, Device::Cpu)
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", dir.display())))?;
            if rec.num_items() != catalog.num_items() {
                return Err(TrainError::Invalid(format!(
                    "{}: the recommender knows {} items, the catalog {}",
                    dir.display(),
                    rec.num_items(),
                    catalog.num_items()
                )));
            }
            let values = rec
                .try_item_embeddings()
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", dir.display())))?;
            let table = Tensor::f_from_slice(&values)?
                .f_view([rec.num_items() as i64, rec.dim() as i64])?
                .f_to_device(device)?;
            let found = (table, Some(rec.version().to_owned()));
            if keep_recommender {
                kept = Some(rec);
            }
            found
        }
        None => (
            Tensor::f_zeros([catalog.num_items() as i64, 64], (Kind::Float, device))?,
            None,
        ),
    };
    let title_ids = catalog
        .titles
        .iter()
        .map(|t| {
            TextEncoder::encode(&base.tokenizer, &format!(" {t}")).map_err(TrainError::Invalid)
        })
        .collect::<Result<Vec<_>>>()?;
    let items = ItemTable {
        vectors,
        title_ids,
        recommender: kept,
    };
    Ok((items, version))
}

/// Copies the trained tensors of a stage output (its latest checkpoint) into `trained`, and a
/// full fine-tune's base weights into `base`.
/// Names present on only one side are reported, so a stage-1 run without ID heads cannot be
/// silently half-loaded.
pub fn load_trained(
    trained: &nn::VarStore,
    base: Option<&nn::VarStore>,
    stage_dir: &Path,
) -> Result<CheckpointManifest> {
    let root = stage_dir.join(CHECKPOINT_DIR);
    let Some(ckpt) = checkpoint::latest(&root)? else {
        return Err(TrainError::BadCheckpoint {
            path: root,
            reason: "no checkpoint yet".into(),
        });
    };
    let (tensors, _) = ckpt.load()?;
    crate::train_loop::restore_split(trained, base, tensors, &ckpt.dir)?;
    Ok(ckpt.manifest)
}

/// One domain's training data for a stage: its dataset name (which picks the templates), its
/// catalog and training rows.
#[derive(Clone, Copy)]
pub struct Domain<'a> {
    pub dataset: &'a str,
    pub catalog: &'a Catalog,
    pub rows: &'a [SeqExample],
}

/// Which rows a `train_limit` keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainSubset {
    /// The first N rows of the split. A split lists each user's rows together, so these are
    /// the rows of the first few users (MovieLens's first 192 rows are all one user's). What
    /// stage files written before this choice existed used.
    #[default]
    First,
    /// N rows evenly spaced over the split (row `i * len / N` for i < N): every part of it,
    /// so nearly every training user, is represented.
    Spread,
}

impl<'a> Domain<'a> {
    /// The rows a stage trains on: `limit` of them chosen by `subset` (all when None or when
    /// the split has no more).
    pub fn limited(&self, limit: Option<usize>, subset: TrainSubset) -> Cow<'a, [SeqExample]> {
        let len = self.rows.len();
        match (limit, subset) {
            (Some(n), TrainSubset::First) if n < len => Cow::Borrowed(&self.rows[..n]),
            (Some(n), TrainSubset::Spread) if n < len => {
                Cow::Owned((0..n).map(|i| self.rows[i * len / n].clone()).collect())
            }
            _ => Cow::Borrowed(self.rows),
        }
    }
}

/// How many rows a stage trains on per epoch: the target's and its mixture's, each cut to
/// `limit` (the progress bars' step counts).
pub fn training_rows(target: &Domain<'_>, others: &[Domain<'_>], limit: Option<usize>) -> usize {
    std::iter::once(target)
        .chain(others)
        .map(|d| limit.map_or(d.rows.len(), |n| n.min(d.rows.len())))
        .sum()
}

/// Training rows as prompts: candidates drawn per (epoch, row) from the template seed, as
/// LLaRA draws its training negatives on the fly.
pub struct TrainRows<'a> {
    pub rows: Cow<'a, [SeqExample]>,
    pub catalog: &'a Catalog,
    pub tokenizer: &'a LlmTokenizer,
    pub builder: PromptBuilder,
    pub mode: PromptMode,
    pub num_candidates: usize,
    /// Whether each prompt also carries every candidate's answer (for L_rank).
    pub candidate_answers: bool,
}

/// Several domains' training rows as one source: index `i` falls in the domain whose range
/// holds it, and that domain's item ids are shifted by its offset into the stage's joint item
/// table (the target domain first, at offset 0), so items of different domains never share
/// an id inside a batch's contrastive losses.
pub struct MixedRows<'a> {
    parts: Vec<(TrainRows<'a>, ItemId)>,
}

impl<'a> MixedRows<'a> {
    /// The domains in order (the target first), each cut to `limit` rows chosen by `subset`,
    /// with prompts in `mode` and the ID-slot token `slot`.
    pub fn new(
        tokenizer: &'a LlmTokenizer,
        domains: &[Domain<'a>],
        slot: u32,
        mode: PromptMode,
        num_candidates: usize,
        (limit, subset): (Option<usize>, TrainSubset),
    ) -> Result<MixedRows<'a>> {
        let mut parts = Vec::new();
        let mut offset: ItemId = 0;
        for domain in domains {
            let rows = domain.limited(limit, subset);
            let builder =
                PromptBuilder::with_builtin_templates(domain.dataset, PromptOptions::new(slot))
                    .map_err(|e| TrainError::Invalid(format!("{}: {e}", domain.dataset)))?;
            let rows = TrainRows {
                rows,
                catalog: domain.catalog,
                tokenizer,
                builder,
                mode,
                num_candidates,
                candidate_answers: false,
            };
            parts.push((rows, offset));
            offset += domain.catalog.num_items() as ItemId;
        }
        Ok(MixedRows { parts })
    }

    /// Prompts that also carry every candidate's answer (L_rank's batches pack them).
    pub fn with_candidate_answers(mut self, on: bool) -> Self {
        for (part, _) in &mut self.parts {
            part.candidate_answers = on;
        }
        self
    }
}

impl ExampleSource for MixedRows<'_> {
    fn len(&self) -> usize {
        self.parts.iter().map(|(p, _)| p.len()).sum()
    }

    fn build(
        &self,
        index: usize,
        template_seed: u64,
        mode: Option<PromptMode>,
    ) -> Result<BuiltPrompt> {
        let mut local = index;
        for (part, offset) in &self.parts {
            if local < part.len() {
                let mut prompt = part.build(local, template_seed, mode)?;
                shift_items(&mut prompt, *offset);
                return Ok(prompt);
            }
            local -= part.len();
        }
        Err(TrainError::Invalid(format!(
            "training row {index} does not exist ({} rows)",
            self.len()
        )))
    }
}

/// Adds `offset` to every item id a prompt carries.
fn shift_items(prompt: &mut BuiltPrompt, offset: ItemId) {
    if offset == 0 {
        return;
    }
    for item in prompt
        .history
        .iter_mut()
        .chain(prompt.candidates.iter_mut())
    {
        *item += offset;
    }
    if let Some(target) = prompt.target.as_mut() {
        *target += offset;
    }
    for slot in &mut prompt.slots {
        slot.item += offset;
    }
    for span in prompt
        .history_spans
        .iter_mut()
        .chain(prompt.candidate_spans.iter_mut())
    {
        span.item += offset;
    }
}

impl ExampleSource for TrainRows<'_> {
    fn len(&self) -> usize {
        self.rows.len()
    }

    fn build(
        &self,
        index: usize,
        template_seed: u64,
        mode: Option<PromptMode>,
    ) -> Result<BuiltPrompt> {
        let row = self
            .rows
            .get(index)
            .ok_or_else(|| TrainError::Invalid(format!("training row {index} does not exist")))?;
        let mut rng = ChaCha8Rng::seed_from_u64(template_seed ^ 0xC0FF_EE00_D15E_A5E5);
        let candidates = draw_candidates(
            &row.history,
            row.target,
            self.catalog.num_items(),
            self.num_candidates,
            &mut rng,
        )
        .map_err(|e| TrainError::Invalid(format!("training row {index}: {e}")))?;
        let named = |e| TrainError::Invalid(format!("training row {index}: {e}"));
        let mut prompt = self
            .builder
            .build(
                self.tokenizer,
                self.catalog,
                &row.history,
                &candidates,
                Some(row.target),
                mode.unwrap_or(self.mode),
                TemplateChoice::Seeded(template_seed),
            )
            .map_err(named)?;
        if self.candidate_answers {
            self.builder
                .add_candidate_answers(self.tokenizer, self.catalog, &mut prompt)
                .map_err(named)?;
        }
        Ok(prompt)
    }
}

/// What differs between two specs, one `field: recorded -> now` each (nested fields by dotted
/// path), so a refused resume says which setting changed.
pub fn spec_differences(recorded: &StageSpec, now: &StageSpec) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                let null = serde_json::Value::Null;
                for key in keys {
                    let field = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(
                        &field,
                        x.get(key).unwrap_or(&null),
                        y.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    match (serde_json::to_value(recorded), serde_json::to_value(now)) {
        (Ok(a), Ok(b)) => walk("", &a, &b, &mut out),
        _ => out.push("the specs cannot be compared".into()),
    }
    out
}

/// A stage started from another stage's output (`init_from`) must continue the same dataset
/// over the same base model: the adapters were trained for those.
fn check_init_from(spec: &StageSpec, init_spec: &StageSpec, init: &Path) -> Result<()> {
    let refuse = |reason: String| {
        Err(TrainError::Invalid(format!(
            "init_from {} {reason}",
            init.display()
        )))
    };
    if init_spec.base_model_sha256 != spec.base_model_sha256 {
        return refuse(format!(
            "was trained over the base model with sha256 {}; this stage's base model has sha256 {}",
            init_spec.base_model_sha256, spec.base_model_sha256
        ));
    }
    if init_spec.dataset != spec.dataset {
        return refuse(format!(
            "was trained on {}; this stage is on {}",
            init_spec.dataset, spec.dataset
        ));
    }
    Ok(())
}

/// The mixture given must be the one the spec names, for stage 1, without the target.
fn check_mixture(spec: &StageSpec, others: &[Domain<'_>]) -> Result<()> {
    let named: Vec<&str> = others.iter().map(|d| d.dataset).collect();
    if named != spec.mixture.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(TrainError::Invalid(format!(
            "the stage spec names the mixture {:?}, the data given is {named:?}",
            spec.mixture
        )));
    }
    if !spec.mixture.is_empty() && spec.stage != 1 {
        return Err(TrainError::Invalid(format!(
            "a mixture of domains is for stage 1 (text-only prompts); stage {} trains on {} alone",
            spec.stage, spec.dataset
        )));
    }
    if spec.mixture.contains(&spec.dataset) {
        return Err(TrainError::Invalid(format!(
            "the mixture {:?} repeats the target dataset {}",
            spec.mixture, spec.dataset
        )));
    }
    Ok(())
}

/// Runs (or resumes) one stage into `out`: `stage.json`, `checkpoints/`.
pub fn run_stage(
    spec: &StageSpec,
    base: &mut LoadedModel,
    catalog: &Catalog,
    train_rows: &[SeqExample],
    out: &Path,
    on_step: &mut dyn FnMut(&StepReport) -> std::ops::ControlFlow<()>,
) -> Result<TrainSummary> {
    let target = Domain {
        dataset: &spec.dataset,
        catalog,
        rows: train_rows,
    };
    run_stage_mixed(spec, base, target, &[], out, on_step)
}

/// [`recorded_spec`] once the directory holds a checkpoint, else None: a directory holding
/// another spec and a checkpoint cannot be resumed with this one. `stage.json` is written
/// before checks that can still fail (the model, the init weights, the warm-up), and a run
/// without a checkpoint starts over when resumed, so until then its spec binds nothing and a
/// corrected one may replace it.
pub fn binding_spec(out: &Path) -> Result<Option<StageSpec>> {
    let pointer = out.join(CHECKPOINT_DIR).join(checkpoint::LATEST_FILE);
    match std::fs::symlink_metadata(&pointer) {
        Ok(_) => recorded_spec(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TrainError::Io {
            path: pointer,
            source,
        }),
    }
}

/// The spec a stage's run directory was started with (`stage.json`), if it was started: a
/// directory holding another spec cannot be resumed with this one.
pub fn recorded_spec(out: &Path) -> Result<Option<StageSpec>> {
    let path = out.join(SPEC_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TrainError::Io { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TrainError::BadCheckpoint {
            path,
            reason: format!("not a stage spec: {e}"),
        })
}

/// [`run_stage`] with the other domains of a stage-1 mixture (`spec.mixture`, in that
/// order; the caller loads their prepared splits).
pub fn run_stage_mixed(
    spec: &StageSpec,
    base: &mut LoadedModel,
    target: Domain<'_>,
    others: &[Domain<'_>],
    out: &Path,
    on_step: &mut dyn FnMut(&StepReport) -> std::ops::ControlFlow<()>,
) -> Result<TrainSummary> {
    let catalog = target.catalog;
    // Before anything is written: a refused spec must not leave a stage.json behind.
    spec.check_combination()?;
    check_mixture(spec, others)?;
    if let Some(init) = &spec.init_from {
        check_init_from(spec, &read_spec(init)?, init)?;
    }
    if !(1..=2).contains(&spec.stage) {
        return Err(TrainError::Invalid(format!(
            "stage {} is not 1 or 2",
            spec.stage
        )));
    }
    if spec.stage == 2 && spec.recommender.is_none() {
        return Err(TrainError::Invalid(
            "stage 2 needs the recommender's item vectors".into(),
        ));
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TrainError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let spec_path = out.join(SPEC_FILE);
    match binding_spec(out)? {
        Some(previous) if &previous != spec => {
            return Err(TrainError::Invalid(format!(
                "{} was started with other settings ({}); resume with the same settings or use a new output directory",
                spec_path.display(),
                spec_differences(&previous, spec).join("; ")
            )));
        }
        Some(_) => {}
        None => {
            rsllm_core::artefact::write_json_atomic(&spec_path, spec).map_err(io(&spec_path))?
        }
    }
    let mut rsllm = build_rsllm(base, spec, catalog)?;
    if !others.is_empty() {
        extend_items(&mut rsllm.items, &base.tokenizer, others)?;
    }
    let checkpoints = out.join(CHECKPOINT_DIR);
    // A resumed run finds everything below in its checkpoint.
    if checkpoint::latest(&checkpoints)?.is_none() {
        // The run starts over: a report of an earlier start's warm-up (one that failed later,
        // perhaps with other settings) is not this run's.
        let warmup_path = out.join(WARMUP_FILE);
        match std::fs::remove_file(&warmup_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io(&warmup_path)(source)),
        }
        let mut init_checkpoint = None;
        if let Some(init) = &spec.init_from {
            // Stage 1 trains the same tensors (adapters, projector, heads): all carry over.
            // Its recommender (none, for stage 1) may differ; its base model may not.
            let manifest = load_trained(&rsllm.trained, Some(&base.vs), init)?;
            manifest.check_provenance(init, &spec.base_model_sha256, None)?;
            init_checkpoint = Some(manifest);
        }
        if let Some(dir) = &spec.heads_from {
            // After init_from: these replace stage 1's projector and heads, not its adapters.
            let (manifest, tensors) = warm_heads::load(dir)?;
            manifest.check_fits(
                dir,
                &StageSide {
                    base_model_sha256: &spec.base_model_sha256,
                    dataset: &spec.dataset,
                    recommender_version: rsllm.recommender_version.as_deref(),
                    prompt_mode: spec.prompt_mode(),
                    ui_similarity: spec.train.loss.ui_similarity,
                    tau: spec.train.loss.tau,
                    init_checkpoint: init_checkpoint
                        .as_ref()
                        .map(|m| (m.step, m.trained_sha256.as_str())),
                },
            )?;
            warm_heads::restore_heads(&rsllm.trained, tensors, dir)?;
            tracing::info!(dir = %dir.display(), folded_hr1 = ?manifest.folded_hr1, "projector and heads from a transport probe");
        }
        if spec.projector_warmup_steps > 0 {
            let report = warm_up_projector(
                &base.model,
                &rsllm.heads,
                &rsllm.trained,
                &rsllm.items,
                &target.limited(spec.train_limit, spec.train_subset),
                WarmupConfig {
                    steps: spec.projector_warmup_steps,
                    candidates: spec.num_candidates,
                    tau: spec.train.loss.tau,
                    seed: spec.train.seed,
                },
            )?;
            tracing::info!(?report, "projector warmed up");
            let path = out.join(WARMUP_FILE);
            rsllm_core::artefact::write_json_atomic(&path, &report).map_err(io(&path))?;
        }
    }
    if spec.freeze_warm_heads {
        // On every start, resumed ones too: the optimizer takes what requires a gradient.
        warm_heads::freeze(&rsllm.trained);
    }
    let slot = base.tokenizer.pad_id.unwrap_or(0);
    let domains: Vec<Domain<'_>> = std::iter::once(target)
        .chain(others.iter().copied())
        .collect();
    let source = MixedRows::new(
        &base.tokenizer,
        &domains,
        slot,
        spec.prompt_mode(),
        spec.num_candidates,
        (spec.train_limit, spec.train_subset),
    )?
    .with_candidate_answers(spec.train.loss.ranking().is_some());
    let trainee = Trainee {
        model: &base.model,
        heads: &rsllm.heads,
        trained: &rsllm.trained,
        base: &base.vs,
        items: &rsllm.items,
        base_model_sha256: spec.base_model_sha256.clone(),
        recommender_version: rsllm.recommender_version.clone(),
    };
    train(&trainee, &source, &spec.train, &checkpoints, None, on_step)
}

/// Appends the other domains' items to a stage-1 item table: their title tokens, and zero ID
/// vectors (stage 1 has no recommender; its prompts carry no slots).
fn extend_items(
    items: &mut ItemTable,
    tokenizer: &LlmTokenizer,
    others: &[Domain<'_>],
) -> Result<()> {
    let mut added = 0i64;
    for domain in others {
        for title in &domain.catalog.titles {
            let ids = TextEncoder::encode(tokenizer, &format!(" {title}"))
                .map_err(|e| TrainError::Invalid(format!("{}: {e}", domain.dataset)))?;
            items.title_ids.push(ids);
        }
        added += domain.catalog.num_items() as i64;
    }
    let zeros = Tensor::f_zeros(
        [added, items.vectors.size()[1]],
        (items.vectors.kind(), items.vectors.device()),
    )?;
    items.vectors = Tensor::f_cat(&[&items.vectors, &zeros], 0)?;
    Ok(())
}

/// A trained stage ready to evaluate over `base`: its spec, the trainable side with the
/// latest checkpoint's tensors loaded, and that checkpoint's step.
pub fn open_stage(
    base: &mut LoadedModel,
    dir: &Path,
    catalog: &Catalog,
) -> Result<(StageSpec, Rsllm, u64)> {
    let spec = read_spec(dir)?;
    let loaded = base.weights_sha256()?;
    if spec.base_model_sha256 != loaded {
        return Err(TrainError::BadCheckpoint {
            path: dir.to_owned(),
            reason: format!(
                "was trained over {} (sha256 {}); the loaded base model {} has sha256 {loaded}",
                spec.base_model.display(),
                spec.base_model_sha256,
                base.path.display()
            ),
        });
    }
    let rsllm = build_rsllm(base, &spec, catalog)?;
    let manifest = load_trained(&rsllm.trained, Some(&base.vs), dir)?;
    manifest.check_provenance(dir, &loaded, Some(rsllm.recommender_version.as_deref()))?;
    Ok((spec, rsllm, manifest.step))
}

/// `<out>/stage.json` of a finished or running stage.
pub fn read_spec(out: &Path) -> Result<StageSpec> {
    let path = out.join(SPEC_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| TrainError::BadCheckpoint {
        path: path.clone(),
        reason: format!("not a stage spec: {e}"),
    })
}

/// The output directory a stage writes to by default: `runs/<dataset>-stage<N>`.
pub fn default_out(dataset: &str, stage: u8) -> PathBuf {
    PathBuf::from("runs").join(format!("{dataset}-stage{stage}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(stage: u8) -> StageSpec {
        StageSpec {
            stage,
            dataset: "movielens".into(),
            base_model: "m.gguf".into(),
            base_model_sha256: "x".into(),
            recommender: None,
            init_from: None,
            train_limit: None,
            train_subset: TrainSubset::Spread,
            num_candidates: 20,
            lora: LoraConfig::default(),
            train: TrainConfig {
                epochs: 1,
                max_steps: None,
                micro_batch: 1,
                grad_accum: 1,
                peak_lr: 1e-3,
                warmup_fraction: 0.0,
                max_grad_norm: 1.0,
                seed: 1,
                checkpoint_every: 1,
                keep_last: 1,
                pad_id: 0,
                loss: crate::LossConfig::default(),
                adamw: crate::AdamWConfig::default(),
                curriculum: false,
                full_finetune: false,
                autocast_bf16: false,
                group_by_length: true,
                length_window_steps: 0,
            },
            no_id_slots: false,
            no_titles: false,
            mixture: Vec::new(),
            user_slot: false,
            user_slot_last: false,
            projector_warmup_steps: 0,
            heads_from: None,
            freeze_warm_heads: false,
        }
    }

    /// Two domains: the fixture's 12 films and 5 artists of a LastFM catalog.
    fn two_domains() -> (
        crate::test_support::Setup,
        Catalog,
        Vec<SeqExample>,
        Vec<SeqExample>,
    ) {
        let setup = crate::test_support::setup();
        let artists = Catalog {
            dataset: "lastfm".into(),
            titles: (0..5).map(|i| format!("Band number {i}")).collect(),
        };
        let row = |history: Vec<ItemId>, target| SeqExample {
            user: 0,
            history,
            target,
            candidates: Vec::new(),
        };
        let films = vec![row(vec![0, 1, 2], 3), row(vec![4, 5], 6)];
        let bands = vec![row(vec![0, 1], 2), row(vec![3], 4), row(vec![2, 4], 0)];
        (setup, artists, films, bands)
    }

    /// The test setup, and its tiny model saved as an HF directory (stages load their own
    /// copy of the base model from there).
    fn setup_with_model_dir() -> (crate::test_support::Setup, tempfile::TempDir) {
        let setup = crate::test_support::setup();
        let tokenizer = LlmTokenizer::from_tokenizer(
            setup.tokenizer.clone(),
            None,
            None,
            Some(rsllm_prompt::testing::PAD_ID),
        );
        let dir = tempfile::tempdir().unwrap();
        rsllm_llm::save_hf_dir(&setup.model, &setup._base, &tokenizer, dir.path()).unwrap();
        (setup, dir)
    }

    #[test]
    fn the_trained_tensors_start_from_the_stage_seed_whatever_was_drawn_before() {
        let _rng = crate::test_support::rng_lock();
        let (setup, dir) = setup_with_model_dir();
        let build = |seed: u64, draws_before: i64| -> Vec<(String, Tensor)> {
            let mut base = rsllm_llm::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
            // Whatever ran before in the process (another stage, SASRec, a test) moved the
            // global generator.
            let _ = Tensor::rand([draws_before], (Kind::Float, Device::Cpu));
            let mut s = spec(1);
            s.train.seed = seed;
            let rsllm = build_rsllm(&mut base, &s, &setup.catalog).unwrap();
            let mut vars: Vec<_> = rsllm.trained.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            vars
        };
        let first = build(1, 3);
        let again = build(1, 1000);
        assert!(first.len() > 4, "LoRA, projector and heads");
        for ((name, a), (_, b)) in first.iter().zip(&again) {
            assert!(a.equal(b), "{name} started differently with the same seed");
        }
        let other = build(2, 3);
        assert!(
            first.iter().zip(&other).any(|((_, a), (_, b))| !a.equal(b)),
            "another seed, the same start"
        );
    }

    /// Two training rows of the fixture's catalog, for runs of a step or two.
    fn two_rows() -> Vec<SeqExample> {
        (0..2)
            .map(|i| SeqExample {
                user: i,
                history: vec![i, i + 1],
                target: i + 2,
                candidates: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_run_that_failed_before_its_first_checkpoint_does_not_bind_the_directory() {
        let _rng = crate::test_support::rng_lock();
        let (setup, model_dir) = setup_with_model_dir();
        let out = tempfile::tempdir().unwrap();
        let rows = two_rows();
        let run = |spec: &StageSpec| {
            // A fresh base each time: a stage attaches its adapters to it.
            let mut base = rsllm_llm::load(model_dir.path(), Device::Cpu, Kind::Float).unwrap();
            run_stage(
                spec,
                &mut base,
                &setup.catalog,
                &rows,
                out.path(),
                &mut |_| std::ops::ControlFlow::Continue(()),
            )
        };
        // Fails after stage.json was written: its recommender does not exist.
        let mut failed = spec(2);
        failed.recommender = Some(out.path().join("no-such-recommender"));
        failed.projector_warmup_steps = 1;
        let err = run(&failed).unwrap_err().to_string();
        assert!(err.contains("no-such-recommender"), "{err}");
        assert_eq!(read_spec(out.path()).unwrap(), failed);
        assert_eq!(
            binding_spec(out.path()).unwrap(),
            None,
            "nothing was trained"
        );
        // As if that run had warmed up before failing.
        std::fs::write(out.path().join(WARMUP_FILE), b"{}").unwrap();

        let mut corrected = spec(1);
        corrected.num_candidates = 4;
        corrected.train.max_steps = Some(1);
        assert_eq!(run(&corrected).unwrap().steps, 1);
        assert_eq!(binding_spec(out.path()).unwrap(), Some(corrected.clone()));
        assert!(
            !out.path().join(WARMUP_FILE).exists(),
            "the failed start's warm-up report is not this run's"
        );

        // Now it has a checkpoint: other settings are refused.
        let mut other = corrected.clone();
        other.train.peak_lr = 1e-4;
        let err = run(&other).unwrap_err().to_string();
        assert!(err.contains("started with other settings"), "{err}");
    }

    #[test]
    fn a_stage_starts_from_warm_heads_only_when_they_fit_it() {
        let _rng = crate::test_support::rng_lock();
        let (mut setup, model_dir) = setup_with_model_dir();
        let work = tempfile::tempdir().unwrap();
        let rec_dir = work.path().join("rec");
        let mut recommender = setup.items.recommender.take().unwrap();
        let version = recommender.save(&rec_dir).unwrap().version;
        // Heads as a transport probe would save them: other values than the stage's seed gives.
        tch::manual_seed(99);
        let made = nn::VarStore::new(Device::Cpu);
        let _made = RsllmHeads::new(&made.root(), 8, 32);
        let tensors: Vec<(String, Tensor)> = made
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let manifest = warm_heads::WarmHeadsManifest {
            base_model_sha256: "x".into(),
            dataset: "movielens".into(),
            recommender_version: Some(version),
            prompt_mode: PromptMode::UnifiedWithUserLast,
            ui_similarity: crate::losses::UiSimilarity::Cosine,
            tau: 0.07,
            read_on: None,
            folded_hr1: Vec::new(),
            heads_sha256: String::new(),
        };
        let warm = work.path().join("warm");
        warm_heads::save(&warm, manifest.clone(), &tensors).unwrap();

        let rows = two_rows();
        let mut warmed = spec(2);
        warmed.recommender = Some(rec_dir);
        (warmed.user_slot, warmed.user_slot_last) = (true, true);
        warmed.heads_from = Some(warm.clone());
        warmed.num_candidates = 4;
        warmed.train.max_steps = Some(1);
        // A step that barely moves: what the checkpoint holds is where the stage started.
        warmed.train.peak_lr = 1e-12;
        let run = |spec: &StageSpec, out: &Path| {
            let mut base = rsllm_llm::load(model_dir.path(), Device::Cpu, Kind::Float).unwrap();
            run_stage(spec, &mut base, &setup.catalog, &rows, out, &mut |_| {
                std::ops::ControlFlow::Continue(())
            })
        };
        let out = work.path().join("stage2");
        assert_eq!(run(&warmed, &out).unwrap().steps, 1);
        let mut base = rsllm_llm::load(model_dir.path(), Device::Cpu, Kind::Float).unwrap();
        let stage = build_rsllm(&mut base, &warmed, &setup.catalog).unwrap();
        load_trained(&stage.trained, Some(&base.vs), &out).unwrap();
        let trained = stage.trained.variables();
        let before_lora: std::collections::HashMap<String, Tensor> =
            trained.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        for (name, tensor) in &tensors {
            let gap = (&trained[name] - tensor).abs().max().double_value(&[]);
            assert!(
                gap < 1e-9,
                "{name} did not start from the warm heads: {gap}"
            );
        }

        // Frozen, they stay as they came however fast the adapters learn.
        let mut frozen = warmed.clone();
        frozen.freeze_warm_heads = true;
        frozen.train.peak_lr = 1e-2;
        let frozen_out = work.path().join("frozen");
        assert_eq!(run(&frozen, &frozen_out).unwrap().steps, 1);
        let mut base = rsllm_llm::load(model_dir.path(), Device::Cpu, Kind::Float).unwrap();
        let stage = build_rsllm(&mut base, &frozen, &setup.catalog).unwrap();
        load_trained(&stage.trained, Some(&base.vs), &frozen_out).unwrap();
        let trained = stage.trained.variables();
        for (name, tensor) in &tensors {
            assert!(trained[name].equal(tensor), "{name} moved while frozen");
        }
        let lora_moved = trained
            .iter()
            .any(|(name, t)| name.contains("lora") && !t.equal(&before_lora[name]));
        assert!(lora_moved, "the adapters did not train");
        let mut unwarmed = frozen.clone();
        unwarmed.heads_from = None;
        let err = unwarmed.check_combination().unwrap_err().to_string();
        assert!(err.contains("freeze_warm_heads"), "{err}");

        // Heads fit on stage 1's model do not start a stage that starts from the base model.
        let mut read_on_stage = manifest;
        read_on_stage.read_on = Some(warm_heads::ReadOn {
            stage_dir: "stage1".into(),
            step: 3,
            trained_sha256: "abc".into(),
        });
        warm_heads::save(&warm, read_on_stage, &tensors).unwrap();
        let err = run(&warmed, &work.path().join("refused"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("read on") && err.contains("step 3") && err.contains("base model alone"),
            "{err}"
        );
        let mut text_only = warmed.clone();
        text_only.no_id_slots = true;
        (text_only.user_slot, text_only.user_slot_last) = (false, false);
        let err = text_only.check_combination().unwrap_err().to_string();
        assert!(
            err.contains("heads_from") && err.contains("no_id_slots"),
            "{err}"
        );
        let mut both = warmed.clone();
        both.projector_warmup_steps = 5;
        let err = both.check_combination().unwrap_err().to_string();
        assert!(err.contains("choose one"), "{err}");
    }

    #[test]
    fn a_mixture_builds_each_row_in_its_domain_with_item_ids_shifted_past_the_target() {
        let _rng = crate::test_support::rng_lock();
        let (setup, artists, films, bands) = two_domains();
        let tokenizer = LlmTokenizer::from_tokenizer(
            setup.tokenizer.clone(),
            None,
            None,
            Some(rsllm_prompt::testing::PAD_ID),
        );
        let film_domain = Domain {
            dataset: "movielens",
            catalog: &setup.catalog,
            rows: &films,
        };
        let band_domain = Domain {
            dataset: "lastfm",
            catalog: &artists,
            rows: &bands,
        };
        let mixed = MixedRows::new(
            &tokenizer,
            &[film_domain, band_domain],
            rsllm_prompt::testing::PAD_ID,
            PromptMode::TextOnly,
            3,
            (None, TrainSubset::Spread),
        )
        .unwrap();
        assert_eq!(mixed.len(), 5);
        let limited = MixedRows::new(
            &tokenizer,
            &[film_domain, band_domain],
            rsllm_prompt::testing::PAD_ID,
            PromptMode::TextOnly,
            3,
            (Some(1), TrainSubset::First),
        )
        .unwrap();
        assert_eq!(limited.len(), 2, "the limit applies to each domain");
        assert_eq!(limited.build(1, 7, None).unwrap().target, Some(12 + 2));
        let film = mixed.build(1, 7, None).unwrap();
        assert!(film.text.contains("Film number 4"), "{}", film.text);
        assert_eq!(film.target, Some(6));
        assert!(film.candidates.iter().all(|&c| c < 12));
        let band = mixed.build(3, 7, None).unwrap();
        assert!(band.text.contains("Band number 3"), "{}", band.text);
        assert!(!band.text.contains("Film"), "{}", band.text);
        assert_eq!(band.target, Some(12 + 4));
        assert_eq!(band.history, vec![12 + 3]);
        assert!(band.candidates.iter().all(|&c| (12..17).contains(&c)));
        assert!(
            band.candidate_spans
                .iter()
                .all(|s| (12..17).contains(&s.item))
        );
        let err = mixed.build(5, 7, None).unwrap_err().to_string();
        assert!(err.contains("training row 5 does not exist"), "{err}");

        // The joint item table holds the artists after the films, and a batch of both
        // domains goes through every loss.
        let mut items = ItemTable {
            vectors: setup.items.vectors.copy(),
            title_ids: setup.items.title_ids.clone(),
            recommender: None,
        };
        extend_items(&mut items, &tokenizer, &[band_domain]).unwrap();
        assert_eq!(items.vectors.size(), [17, 8]);
        assert_eq!(items.title_ids.len(), 17);
        assert_eq!(
            items.title_ids[12 + 2],
            TextEncoder::encode(&tokenizer, " Band number 2").unwrap()
        );
        let prompts: Vec<_> = (0..5).map(|i| mixed.build(i, 3, None).unwrap()).collect();
        let batch =
            crate::batch::collate(&prompts, rsllm_prompt::testing::PAD_ID, Device::Cpu).unwrap();
        let out = crate::objective::losses(
            &setup.model,
            &setup.heads,
            &items,
            &batch,
            &crate::LossConfig::default(),
        )
        .unwrap();
        assert!(out.total.double_value(&[]).is_finite());
        assert!(
            out.read_terms().unwrap().ui > 0.0,
            "L_ui sees both domains' items"
        );
        // With L_rank on, each prompt carries its candidates' answers, in its own domain.
        assert!(prompts.iter().all(|p| p.candidate_answer_ids.is_empty()));
        let mixed = mixed.with_candidate_answers(true);
        let prompts: Vec<_> = (0..5).map(|i| mixed.build(i, 3, None).unwrap()).collect();
        let band = &prompts[3];
        assert_eq!(band.candidate_answer_ids.len(), band.candidates.len());
        assert_eq!(
            band.candidate_answer_ids[band.target_index.unwrap()],
            band.answer_ids
        );
        let ranked = crate::batch::collate_ranked(
            &prompts,
            usize::MAX,
            rsllm_prompt::testing::PAD_ID,
            Device::Cpu,
        )
        .unwrap();
        let config = crate::LossConfig {
            lambda_rank: 1.0,
            ..crate::LossConfig::default()
        };
        let out =
            crate::objective::losses(&setup.model, &setup.heads, &items, &ranked, &config).unwrap();
        let rank = out.read_terms().unwrap().rank;
        assert!(rank > 0.0 && rank.is_finite(), "{rank}");
    }

    #[test]
    fn a_mixture_must_match_the_spec_be_stage_one_and_leave_out_the_target() {
        let _rng = crate::test_support::rng_lock();
        let (_setup, artists, _, bands) = two_domains();
        let band_domain = Domain {
            dataset: "lastfm",
            catalog: &artists,
            rows: &bands,
        };
        let mut s = spec(1);
        s.mixture = vec!["lastfm".into()];
        assert!(check_mixture(&s, &[band_domain]).is_ok());
        let err = check_mixture(&s, &[]).unwrap_err().to_string();
        assert!(err.contains("names the mixture [\"lastfm\"]"), "{err}");
        let mut two = spec(2);
        two.mixture = vec!["lastfm".into()];
        let err = check_mixture(&two, &[band_domain]).unwrap_err().to_string();
        assert!(err.contains("for stage 1"), "{err}");
        let mut repeated = spec(1);
        repeated.mixture = vec!["movielens".into()];
        let films = Domain {
            dataset: "movielens",
            ..band_domain
        };
        let err = check_mixture(&repeated, &[films]).unwrap_err().to_string();
        assert!(err.contains("repeats the target"), "{err}");
    }

    #[test]
    fn a_changed_setting_is_named_with_both_values() {
        let recorded = spec(2);
        let mut now = spec(2);
        now.base_model_sha256 = "y".into();
        now.train.peak_lr = 1e-4;
        let diff = spec_differences(&recorded, &now);
        assert_eq!(
            diff,
            [
                "base_model_sha256: \"x\" -> \"y\"".to_owned(),
                format!("train.peak_lr: {} -> 0.0001", recorded.train.peak_lr),
            ]
        );
        assert!(spec_differences(&recorded, &recorded).is_empty());
    }

    #[test]
    fn a_stage_starts_only_from_one_of_the_same_dataset_and_base_model() {
        let stage1 = spec(1);
        let dir = Path::new("runs/movielens-stage1");
        assert!(check_init_from(&spec(2), &stage1, dir).is_ok());
        let mut other_base = spec(2);
        other_base.base_model_sha256 = "y".into();
        let err = check_init_from(&other_base, &stage1, dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("runs/movielens-stage1")
                && err.contains("sha256 x")
                && err.contains("sha256 y"),
            "{err}"
        );
        let mut other_data = spec(2);
        other_data.dataset = "lastfm".into();
        let err = check_init_from(&other_data, &stage1, dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("trained on movielens; this stage is on lastfm"),
            "{err}"
        );
    }

    #[test]
    fn prompt_modes_follow_the_stage_and_the_no_slots_ablation() {
        assert_eq!(spec(1).prompt_mode(), PromptMode::TextOnly);
        assert_eq!(spec(2).prompt_mode(), PromptMode::Unified);
        let mut ablated = spec(2);
        ablated.no_id_slots = true;
        assert_eq!(ablated.prompt_mode(), PromptMode::TextOnly);
        let mut ablated = spec(2);
        ablated.no_titles = true;
        assert_eq!(ablated.prompt_mode(), PromptMode::IdOnly);
        let mut with_user = spec(2);
        with_user.user_slot = true;
        assert_eq!(with_user.prompt_mode(), PromptMode::UnifiedWithUser);
        assert!(with_user.check_combination().is_ok());
        let mut last = with_user.clone();
        last.user_slot_last = true;
        assert_eq!(last.prompt_mode(), PromptMode::UnifiedWithUserLast);
        assert!(last.check_combination().is_ok());
        last.user_slot = false;
        let err = last.check_combination().unwrap_err().to_string();
        assert!(
            err.contains("user_slot_last") && err.contains("needs user_slot"),
            "{err}"
        );
        for (stage, no_slots, no_titles, named) in [
            (1, false, false, "stage 1"),
            (2, true, false, "no_id_slots"),
            (2, false, true, "no_titles"),
        ] {
            let mut s = with_user.clone();
            (s.stage, s.no_id_slots, s.no_titles) = (stage, no_slots, no_titles);
            let err = s.check_combination().unwrap_err().to_string();
            assert!(err.contains("user_slot") && err.contains(named), "{err}");
        }
    }

    #[test]
    fn a_limit_keeps_the_first_rows_or_rows_spread_over_the_split() {
        let rows: Vec<SeqExample> = (0..10)
            .map(|i| SeqExample {
                user: i / 3,
                history: vec![i],
                target: i + 1,
                candidates: Vec::new(),
            })
            .collect();
        let catalog = Catalog {
            dataset: "movielens".into(),
            titles: Vec::new(),
        };
        let domain = Domain {
            dataset: "movielens",
            catalog: &catalog,
            rows: &rows,
        };
        let targets = |kept: &[SeqExample]| kept.iter().map(|r| r.target).collect::<Vec<_>>();
        assert_eq!(
            targets(&domain.limited(Some(4), TrainSubset::First)),
            [1, 2, 3, 4]
        );
        // Rows 0, 2, 5 and 7: users 0, 1 and 2, where the first four rows hold users 0 and 1.
        let spread = domain.limited(Some(4), TrainSubset::Spread);
        assert_eq!(targets(&spread), [1, 3, 6, 8]);
        let users: std::collections::BTreeSet<u32> = spread.iter().map(|r| r.user).collect();
        assert_eq!(users.len(), 3);
        for subset in [TrainSubset::First, TrainSubset::Spread] {
            assert_eq!(domain.limited(None, subset).len(), 10);
            assert_eq!(domain.limited(Some(50), subset).len(), 10);
            assert!(matches!(domain.limited(None, subset), Cow::Borrowed(_)));
        }
        assert_eq!(training_rows(&domain, &[domain], Some(4)), 8);
    }

    #[test]
    fn the_projector_warm_up_is_a_stage_two_setting_with_slots() {
        let mut warmed = spec(2);
        warmed.projector_warmup_steps = 10;
        assert!(warmed.check_combination().is_ok());
        warmed.user_slot = true;
        assert!(warmed.check_combination().is_ok());
        warmed.user_slot = false;
        warmed.no_titles = true;
        assert!(
            warmed.check_combination().is_ok(),
            "ID-only prompts have slots"
        );
        for (stage, no_slots, named) in [(1, false, "stage 1"), (2, true, "no_id_slots")] {
            let mut s = spec(2);
            s.projector_warmup_steps = 10;
            (s.stage, s.no_id_slots) = (stage, no_slots);
            let err = s.check_combination().unwrap_err().to_string();
            assert!(
                err.contains("projector_warmup_steps") && err.contains(named),
                "{err}"
            );
        }
    }

    /// stage.json files written before `curriculum` and `no_id_slots` existed still load (and
    /// mean neither), so earlier runs resume and serve unchanged.
    #[test]
    fn older_stage_files_without_the_new_fields_still_load() {
        let mut value = serde_json::to_value(spec(2)).unwrap();
        value.as_object_mut().unwrap().remove("no_id_slots");
        value.as_object_mut().unwrap().remove("no_titles");
        value.as_object_mut().unwrap().remove("mixture");
        value.as_object_mut().unwrap().remove("user_slot");
        value.as_object_mut().unwrap().remove("user_slot_last");
        value.as_object_mut().unwrap().remove("train_subset");
        value
            .as_object_mut()
            .unwrap()
            .remove("projector_warmup_steps");
        value.as_object_mut().unwrap().remove("heads_from");
        value.as_object_mut().unwrap().remove("freeze_warm_heads");
        value["train"].as_object_mut().unwrap().remove("curriculum");
        // L_ui's settings: the cosine and the candidates, as before they were settings.
        let loss = value["train"]["loss"].as_object_mut().unwrap();
        assert!(loss.remove("ui_similarity").is_some() && loss.remove("ui_negatives").is_some());
        let back: StageSpec = serde_json::from_value(value).unwrap();
        // Which rows a limit keeps: the first, as before the choice existed.
        let mut expected = spec(2);
        expected.train_subset = TrainSubset::First;
        assert_eq!(back, expected);
    }
}
