//! Shared test fixtures: a tiny random Llama with LoRA, RSLLM heads, a 12-item catalog and a
//! tiny tokenizer trained on its titles.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rsllm_core::dataset::candidates::draw_candidates;
use rsllm_core::{Catalog, SeqExample};
use rsllm_llm::{Llama, LlamaConfig, LlmTokenizer, LoraConfig};
use rsllm_prompt::testing::{PAD_ID, tiny_tokenizer};
use rsllm_prompt::{
    BuiltPrompt, PromptBuilder, PromptMode, PromptOptions, TemplateChoice, TextEncoder,
};
use tch::{Device, Kind, Tensor, nn};

use crate::batch::{Batch, collate};
use crate::objective::{ItemTable, RsllmHeads};

pub(crate) struct Setup {
    pub _base: nn::VarStore,
    pub trained: nn::VarStore,
    pub model: Llama,
    pub heads: RsllmHeads,
    pub items: ItemTable,
    pub catalog: Catalog,
    pub tokenizer: tokenizers::Tokenizer,
}

/// The fixture. The caller must hold [`rng_lock`]: it seeds and draws from libtorch's global
/// generator, and a test drawing beside another one's training run changes that run's dropout
/// masks (a resumed run then no longer matches its uninterrupted twin).
pub(crate) fn setup() -> Setup {
    // Catches a test that forgot the lock whenever no other test holds it (always when the
    // tests run one at a time).
    assert!(
        TORCH_RNG.try_lock().is_err(),
        "test_support::setup() needs the caller to hold test_support::rng_lock()"
    );
    tch::manual_seed(11);
    let titles: Vec<String> = (0..12).map(|i| format!("Film number {i}")).collect();
    let catalog = Catalog {
        dataset: "movielens".into(),
        titles: titles.clone(),
    };
    let mut corpus = titles.clone();
    corpus.push("This user has watched in the previous. Please predict the next movie".into());
    let tokenizer = tiny_tokenizer(&corpus, 300).unwrap();
    let config = LlamaConfig {
        vocab_size: 320,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_ids: vec![],
    };
    let mut base = nn::VarStore::new(Device::Cpu);
    let mut model = Llama::new(&base.root(), &config).unwrap();
    tch::no_grad(|| {
        // Sorted: HashMap order differs between stores, and two setups must be equal.
        let mut vars: Vec<_> = base.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut var) in vars {
            let value = if name.ends_with("norm.weight") {
                Tensor::ones(var.size(), (Kind::Float, Device::Cpu))
            } else {
                Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.1
            };
            var.copy_(&value);
        }
    });
    base.freeze();
    let trained = nn::VarStore::new(Device::Cpu);
    model
        .attach_lora(&trained.root(), &LoraConfig::default())
        .unwrap();
    let heads = RsllmHeads::new(&trained.root(), 8, 32);
    let title_ids = titles
        .iter()
        .map(|t| tokenizer.encode(&format!(" {t}")).unwrap())
        .collect();
    let vectors = Tensor::randn([12, 8], (Kind::Float, Device::Cpu));
    // Last: it reseeds libtorch's generator. Its user states fill user slots; the item
    // vectors above stay random (no test needs the two to agree).
    let recommender = rsllm_recommender::RecModel::new_untrained(
        rsllm_recommender::ModelKind::Sasrec,
        rsllm_recommender::RecConfig {
            dim: 8,
            num_heads: 2,
            ..rsllm_recommender::RecConfig::default_for(rsllm_recommender::ModelKind::Sasrec)
        },
        "movielens",
        12,
        Device::Cpu,
    )
    .unwrap();
    let items = ItemTable {
        vectors,
        title_ids,
        recommender: Some(recommender),
    };
    Setup {
        _base: base,
        trained,
        model,
        heads,
        items,
        catalog,
        tokenizer,
    }
}

/// The fixture's tokenizer as the LLM's, and MovieLens's prompt builder.
pub(crate) fn prompt_side(s: &Setup) -> (LlmTokenizer, PromptBuilder) {
    let tokenizer = LlmTokenizer::from_tokenizer(s.tokenizer.clone(), None, None, Some(PAD_ID));
    let builder =
        PromptBuilder::with_builtin_templates("movielens", PromptOptions::new(PAD_ID)).unwrap();
    (tokenizer, builder)
}

/// Twelve users of the 12-item catalog whose next item follows from their history
/// (`[a, a+1, a+2] -> a+3`), each with `candidates` candidates (the target included).
pub(crate) fn probe_rows(candidates: usize) -> Vec<SeqExample> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    (0..12u32)
        .map(|a| {
            let history = vec![a, (a + 1) % 12, (a + 2) % 12];
            let target = (a + 3) % 12;
            let candidates = draw_candidates(&history, target, 12, candidates, &mut rng).unwrap();
            SeqExample {
                user: a,
                history,
                target,
                candidates,
            }
        })
        .collect()
}

/// Two prompts of the 12-item catalog, each with its candidates' answers.
pub(crate) fn prompts(s: &Setup, mode: PromptMode) -> Vec<BuiltPrompt> {
    let builder =
        PromptBuilder::with_builtin_templates("movielens", PromptOptions::new(PAD_ID)).unwrap();
    let rows = [
        (vec![0u32, 1, 2], vec![5u32, 6, 7, 8], 6u32),
        (vec![3, 4], vec![9, 10, 11, 5], 11),
    ];
    rows.iter()
        .map(|(h, c, t)| {
            let mut p = builder
                .build(
                    &s.tokenizer,
                    &s.catalog,
                    h,
                    c,
                    Some(*t),
                    mode,
                    TemplateChoice::Fixed(0),
                )
                .unwrap();
            builder
                .add_candidate_answers(&s.tokenizer, &s.catalog, &mut p)
                .unwrap();
            p
        })
        .collect()
}

pub(crate) fn batch(s: &Setup, mode: PromptMode) -> Batch {
    collate(&prompts(s, mode), PAD_ID, Device::Cpu).unwrap()
}

/// libtorch's generator is global: tests that seed it and then draw from it (dropout) hold
/// this lock so that parallel tests do not interleave their draws.
pub(crate) static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

/// A setup whose every tensor (base, trained, item vectors) and tokenizer equal `like`'s:
/// two "processes" of one experiment.
pub(crate) fn setup_like(like: &Setup) -> Setup {
    let mut s = setup();
    let copy_all = |from: &nn::VarStore, to: &nn::VarStore| {
        let source = from.variables();
        tch::no_grad(|| {
            for (name, mut var) in to.variables() {
                var.copy_(&source[&name]);
            }
        });
    };
    copy_all(&like._base, &s._base);
    copy_all(&like.trained, &s.trained);
    s.items.vectors = like.items.vectors.copy();
    s.items.title_ids = like.items.title_ids.clone();
    s.tokenizer = like.tokenizer.clone();
    s
}
