//! The `rsllm.v1.EmbeddingService` implementation: validate, look up the model, delegate.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rsllm_common::metrics::{Registry as MetricsRegistry, RpcMetrics};
use rsllm_core::ItemId;
use rsllm_proto::v1::EMBEDDING_SERVICE_NAME;
use rsllm_proto::v1::embedding_service_server::EmbeddingService;
use rsllm_proto::v1::{
    GetItemEmbeddingsRequest, GetItemEmbeddingsResponse, GetUserStateRequest, GetUserStateResponse,
    ListModelsRequest, ListModelsResponse, ModelInfo, ScoreCandidatesRequest,
    ScoreCandidatesResponse, ScoredItem, TopKRequest, TopKResponse,
};
use rsllm_recommender::ModelKind;
use tonic::{Request, Response, Status};

use crate::error::ServiceError;
use crate::registry::{LoadedModel, Registry};

/// Request-size limits (from the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_ids: usize,
    pub max_history_len: usize,
}

/// State shared by the handlers; the registry appears once loading finishes.
#[derive(Debug)]
pub struct ApiState {
    registry: OnceLock<Arc<Registry>>,
    limits: Limits,
    test_delay: Duration,
}

impl ApiState {
    pub fn new(limits: Limits, test_delay: Duration) -> ApiState {
        ApiState {
            registry: OnceLock::new(),
            limits,
            test_delay,
        }
    }

    /// Installs the loaded models (once; later calls are ignored and return false).
    pub fn set_registry(&self, registry: Arc<Registry>) -> bool {
        self.registry.set(registry).is_ok()
    }

    fn registry(&self) -> Result<&Registry, ServiceError> {
        self.registry
            .get()
            .map(|r| r.as_ref())
            .ok_or(ServiceError::Loading)
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct EmbeddingApi {
    state: Arc<ApiState>,
    metrics: RpcMetrics,
}

impl EmbeddingApi {
    /// The service with its metrics in a registry of its own (tests).
    pub fn new(state: Arc<ApiState>) -> EmbeddingApi {
        EmbeddingApi::with_registry(state, &MetricsRegistry::new())
    }

    /// The service, recording per-method latency and status in `registry`.
    pub fn with_registry(state: Arc<ApiState>, registry: &MetricsRegistry) -> EmbeddingApi {
        EmbeddingApi {
            state,
            metrics: RpcMetrics::new(registry, EMBEDDING_SERVICE_NAME),
        }
    }

    async fn test_delay(&self, rpc: &str) {
        let delay = self.state.test_delay;
        if !delay.is_zero() {
            tracing::warn!(
                rpc,
                ms = delay.as_millis() as u64,
                "test delay: holding the call"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// Non-empty, within `limit`, every id `< item_count`.
fn check_ids(
    field: &'static str,
    ids: &[u32],
    model: &LoadedModel,
    limit: usize,
) -> Result<(), ServiceError> {
    if ids.is_empty() {
        return Err(ServiceError::EmptyField { field });
    }
    if ids.len() > limit {
        return Err(ServiceError::TooMany {
            field,
            len: ids.len(),
            limit,
        });
    }
    if let Some((index, &value)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= model.num_items)
    {
        return Err(ServiceError::ItemOutOfRange {
            field,
            index,
            value,
            model: model.name.clone(),
            item_count: model.num_items,
        });
    }
    Ok(())
}

/// The history rule: non-empty, at most `--max-history-len`, ids in range; then cut to the
/// model's window (its last `max_history` items).
fn window(
    history: &[u32],
    model: &LoadedModel,
    limits: Limits,
) -> Result<Vec<ItemId>, ServiceError> {
    check_ids("history", history, model, limits.max_history_len)?;
    let start = history.len().saturating_sub(model.max_history);
    Ok(history[start..].to_vec())
}

fn proto_kind(kind: ModelKind) -> rsllm_proto::v1::ModelKind {
    match kind {
        ModelKind::Sasrec => rsllm_proto::v1::ModelKind::Sasrec,
        ModelKind::Gru4rec => rsllm_proto::v1::ModelKind::Gru4rec,
        ModelKind::Caser => rsllm_proto::v1::ModelKind::Caser,
    }
}

/// The `k` best of `scores` (index = item id), skipping `exclude`; best first, ties by the
/// lower id, NaN ranked last.
fn top_k(scores: &[f32], k: usize, exclude: &HashSet<ItemId>) -> Vec<ScoredItem> {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    let mut items: Vec<ScoredItem> = (0u32..)
        .zip(scores)
        .filter(|(id, _)| !exclude.contains(id))
        .map(|(item_id, &score)| ScoredItem { item_id, score })
        .collect();
    let order = |a: &ScoredItem, b: &ScoredItem| {
        key(b.score)
            .total_cmp(&key(a.score))
            .then(a.item_id.cmp(&b.item_id))
    };
    if k < items.len() {
        items.select_nth_unstable_by(k, order);
        items.truncate(k);
    }
    items.sort_unstable_by(order);
    items
}

#[tonic::async_trait]
impl EmbeddingService for EmbeddingApi {
    async fn get_item_embeddings(
        &self,
        request: Request<GetItemEmbeddingsRequest>,
    ) -> Result<Response<GetItemEmbeddingsResponse>, Status> {
        let span = self.metrics.span("GetItemEmbeddings", request.metadata());
        let handled = async move {
            self.test_delay("GetItemEmbeddings").await;
            let req = request.into_inner();
            let model = self.state.registry()?.get(&req.model)?;
            check_ids("item_ids", &req.item_ids, model, self.state.limits.max_ids)?;
            let mut values = Vec::with_capacity(req.item_ids.len() * model.dim);
            for &id in &req.item_ids {
                let row = model.vector(id).ok_or_else(|| {
                    ServiceError::internal("reading item vectors", format!("row {id}"))
                })?;
                values.extend_from_slice(row);
            }
            Ok::<_, ServiceError>(GetItemEmbeddingsResponse {
                model_version: model.version.clone(),
                dim: model.dim as u32,
                values,
            })
        };
        self.metrics
            .observe("GetItemEmbeddings", span, handled)
            .await
            .map(Response::new)
    }

    async fn score_candidates(
        &self,
        request: Request<ScoreCandidatesRequest>,
    ) -> Result<Response<ScoreCandidatesResponse>, Status> {
        let span = self.metrics.span("ScoreCandidates", request.metadata());
        let handled = async move {
            self.test_delay("ScoreCandidates").await;
            let req = request.into_inner();
            let model = self.state.registry()?.get(&req.model)?.clone();
            let history = window(&req.history, &model, self.state.limits)?;
            check_ids(
                "candidates",
                &req.candidates,
                &model,
                self.state.limits.max_ids,
            )?;
            let expected = req.candidates.len();
            let candidates = req.candidates;
            let mut rows = model
                .with_model("scoring candidates", move |m| {
                    m.score_candidates(&[history], &[candidates])
                })
                .await?;
            let scores = rows.pop().unwrap_or_default();
            if scores.len() != expected {
                return Err(ServiceError::internal(
                    "scoring candidates",
                    format!("{} scores for {expected} candidates", scores.len()),
                ));
            }
            Ok::<_, ServiceError>(ScoreCandidatesResponse {
                model_version: model.version.clone(),
                scores,
            })
        };
        self.metrics
            .observe("ScoreCandidates", span, handled)
            .await
            .map(Response::new)
    }

    async fn top_k(&self, request: Request<TopKRequest>) -> Result<Response<TopKResponse>, Status> {
        let span = self.metrics.span("TopK", request.metadata());
        let handled = async move {
            self.test_delay("TopK").await;
            let req = request.into_inner();
            let model = self.state.registry()?.get(&req.model)?.clone();
            if req.k == 0 || req.k as usize > model.num_items {
                return Err(ServiceError::KOutOfRange {
                    k: req.k,
                    model: model.name.clone(),
                    item_count: model.num_items,
                });
            }
            let history = window(&req.history, &model, self.state.limits)?;
            // Excluded: every item of the request's history, not only those in the window.
            let exclude: HashSet<ItemId> = if req.exclude_history {
                req.history.iter().copied().collect()
            } else {
                HashSet::new()
            };
            let (k, num_items) = (req.k as usize, model.num_items);
            let items = model
                .with_model("ranking items", move |m| {
                    let mut rows = m.score_all(&[history])?;
                    let scores = rows.pop().unwrap_or_default();
                    if scores.len() != num_items {
                        return Err(rsllm_recommender::RecError::Invalid(format!(
                            "{} scores for {num_items} items",
                            scores.len()
                        )));
                    }
                    Ok(top_k(&scores, k, &exclude))
                })
                .await?;
            Ok::<_, ServiceError>(TopKResponse {
                model_version: model.version.clone(),
                items,
            })
        };
        self.metrics
            .observe("TopK", span, handled)
            .await
            .map(Response::new)
    }

    async fn get_user_state(
        &self,
        request: Request<GetUserStateRequest>,
    ) -> Result<Response<GetUserStateResponse>, Status> {
        let span = self.metrics.span("GetUserState", request.metadata());
        let handled = async move {
            self.test_delay("GetUserState").await;
            let req = request.into_inner();
            let model = self.state.registry()?.get(&req.model)?.clone();
            let history = window(&req.history, &model, self.state.limits)?;
            let dim = model.dim;
            let values = model
                .with_model("encoding the history", move |m| {
                    let state = m.user_states(&[history.as_slice()])?;
                    let values = Vec::<f32>::try_from(state.f_flatten(0, -1)?)?;
                    if values.len() != dim {
                        return Err(rsllm_recommender::RecError::Invalid(format!(
                            "a user state of {} values, the model's width is {dim}",
                            values.len()
                        )));
                    }
                    Ok(values)
                })
                .await?;
            Ok::<_, ServiceError>(GetUserStateResponse {
                model_version: model.version.clone(),
                values,
            })
        };
        self.metrics
            .observe("GetUserState", span, handled)
            .await
            .map(Response::new)
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let span = self.metrics.span("ListModels", request.metadata());
        let handled = async move {
            let registry = self.state.registry()?;
            let models = registry
                .models()
                .iter()
                .map(|m| ModelInfo {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    kind: proto_kind(m.kind) as i32,
                    dataset: m.dataset.clone(),
                    protocol: m.protocol.clone(),
                    item_count: m.num_items as u32,
                    dim: m.dim as u32,
                    max_history: m.max_history as u32,
                })
                .collect();
            Ok::<_, ServiceError>(ListModelsResponse { models })
        };
        self.metrics
            .observe("ListModels", span, handled)
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_best_first_skips_excluded_and_breaks_ties_by_id() {
        let scores = [0.5, 2.0, f32::NAN, 2.0, -1.0, 3.0];
        let none = HashSet::new();
        let ids = |v: Vec<ScoredItem>| v.into_iter().map(|s| s.item_id).collect::<Vec<_>>();
        assert_eq!(ids(top_k(&scores, 3, &none)), vec![5, 1, 3]);
        assert_eq!(ids(top_k(&scores, 6, &none)), vec![5, 1, 3, 0, 4, 2]);
        let exclude: HashSet<ItemId> = [5, 1].into_iter().collect();
        assert_eq!(ids(top_k(&scores, 2, &exclude)), vec![3, 0]);
        // Fewer than k remain after exclusion: all of them come back.
        assert_eq!(top_k(&scores, 6, &exclude).len(), 4);
    }
}

#[cfg(test)]
mod loading_tests {
    use super::*;

    #[tokio::test]
    async fn calls_before_the_models_are_loaded_are_unavailable() {
        let state = Arc::new(ApiState::new(
            Limits {
                max_ids: 10,
                max_history_len: 10,
            },
            Duration::ZERO,
        ));
        let api = EmbeddingApi::new(state);
        let status = api
            .get_item_embeddings(Request::new(GetItemEmbeddingsRequest {
                model: "m".into(),
                item_ids: vec![1],
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let status = api
            .list_models(Request::new(ListModelsRequest {}))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }
}
