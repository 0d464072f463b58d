//! The `rsllm.v1.PromptService` handlers.

use std::sync::{Arc, OnceLock};

use rsllm_common::metrics::{Counter, Registry, RpcMetrics};
use rsllm_itemvec::{ItemVectors, Reader, ReaderError, Source};
use rsllm_prompt::{PromptMode, SlotRole, TemplateChoice};
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::prompt_service_server::PromptService;
use tonic::{Code, Request, Response, Status};

use crate::domains::{Domain, Domains};
use crate::error::ServiceError;

/// Request limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_history_len: usize,
    pub max_candidates: usize,
}

/// Shared by every handler: the loaded domains (set once loading finishes), the vector reader
/// and the metrics.
pub struct ApiState {
    domains: OnceLock<Arc<Domains>>,
    reader: Reader,
    limits: Limits,
    metrics: RpcMetrics,
    /// Slot-vector reads by where they were answered (`redis`, `mixed`, `grpc`): the cache
    /// hit ratio is `redis / sum`.
    vector_reads: Counter,
}

impl ApiState {
    pub fn new(reader: Reader, limits: Limits, registry: &Registry) -> ApiState {
        ApiState {
            domains: OnceLock::new(),
            reader,
            limits,
            metrics: RpcMetrics::new(registry, pb::PROMPT_SERVICE_NAME),
            vector_reads: registry.counter(
                "rsllm_prompt_vector_reads_total",
                "Slot-vector reads by source: redis (cache hit), mixed, grpc (miss or Redis down).",
                &["source"],
            ),
        }
    }

    pub fn set_domains(&self, domains: Arc<Domains>) {
        let _ = self.domains.set(domains);
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    fn domains(&self) -> Result<&Arc<Domains>, ServiceError> {
        self.domains.get().ok_or(ServiceError::Loading)
    }

    fn domain(&self, name: &str) -> Result<(Arc<Domains>, Arc<Domain>), ServiceError> {
        let domains = self.domains()?;
        match domains.by_name.get(name) {
            Some(d) => Ok((domains.clone(), d.clone())),
            None => Err(ServiceError::UnknownDomain {
                domain: name.to_owned(),
                served: domains.served(),
            }),
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct PromptApi {
    state: Arc<ApiState>,
}

impl PromptApi {
    pub fn new(state: Arc<ApiState>) -> PromptApi {
        PromptApi { state }
    }

    async fn build(
        &self,
        req: pb::BuildPromptRequest,
    ) -> Result<pb::BuildPromptResponse, ServiceError> {
        let limits = self.state.limits;
        let mode = match pb::PromptMode::try_from(req.mode) {
            Ok(pb::PromptMode::TextOnly) => PromptMode::TextOnly,
            Ok(pb::PromptMode::Unified) => PromptMode::Unified,
            Ok(pb::PromptMode::IdOnly) => PromptMode::IdOnly,
            Ok(pb::PromptMode::UnifiedWithUser) => PromptMode::UnifiedWithUser,
            Ok(pb::PromptMode::UnifiedWithUserLast) => PromptMode::UnifiedWithUserLast,
            Ok(pb::PromptMode::Unspecified) | Err(_) => {
                return Err(ServiceError::Invalid(format!(
                    "mode = {}: expected PROMPT_MODE_TEXT_ONLY, PROMPT_MODE_UNIFIED, PROMPT_MODE_ID_ONLY, PROMPT_MODE_UNIFIED_WITH_USER or PROMPT_MODE_UNIFIED_WITH_USER_LAST",
                    req.mode
                )));
            }
        };
        if req.history.len() > limits.max_history_len {
            return Err(ServiceError::Invalid(format!(
                "history has {} items, more than the limit of {}",
                req.history.len(),
                limits.max_history_len
            )));
        }
        if req.candidates.len() > limits.max_candidates {
            return Err(ServiceError::Invalid(format!(
                "candidates has {} items, more than the limit of {}",
                req.candidates.len(),
                limits.max_candidates
            )));
        }
        let (domains, domain) = self.state.domain(&req.domain)?;
        let template = req.template_index.unwrap_or(0) as usize;
        // Tokenising a few hundred tokens is CPU work: off the async workers.
        let assembled = tokio::task::spawn_blocking(move || {
            let encoder = domains.tokenizer.as_ref();
            let built = domain
                .builder
                .build(
                    encoder,
                    &domain.catalog,
                    &req.history,
                    &req.candidates,
                    None,
                    mode,
                    TemplateChoice::Fixed(template),
                )
                .map_err(ServiceError::from_prompt)?;
            let continuations = req
                .candidates
                .iter()
                .map(|&item| {
                    let (_, token_ids) = domain
                        .builder
                        .continuation(encoder, &domain.catalog, item)
                        .map_err(ServiceError::from_prompt)?;
                    Ok(pb::CandidateContinuation {
                        item_id: item,
                        token_ids,
                        title: domain.catalog.title(item).unwrap_or_default().to_owned(),
                    })
                })
                .collect::<Result<Vec<_>, ServiceError>>()?;
            Ok::<_, ServiceError>((built, continuations, domain))
        })
        .await
        .map_err(|e| ServiceError::internal("building the prompt", e))??;
        let (built, continuations, domain) = assembled;

        let mut response = pb::BuildPromptResponse {
            input_ids: built.input_ids,
            slots: built
                .slots
                .iter()
                .map(|s| pb::IdSlot {
                    position: s.position as u32,
                    item_id: s.item,
                    user: s.role == SlotRole::User,
                })
                .collect(),
            candidate_spans: built
                .candidate_spans
                .iter()
                .map(|s| pb::CandidateSpan {
                    item_id: s.item,
                    start: s.start as u32,
                    end: s.end as u32,
                })
                .collect(),
            continuations,
            text: built.text,
            template_index: built.template_index as u32,
            ..Default::default()
        };
        if !built.slots.is_empty() {
            let reader = &self.state.reader;
            let has_user_slot = built.slots.iter().any(|s| s.role == SlotRole::User);
            // The user state first: the item vectors are then read for the very model version
            // that computed it, so the two cannot come from a model swapped in between.
            let (model, user_state) = if has_user_slot {
                let (version, state) = reader
                    .user_state(&domain.recommender, &built.history)
                    .await
                    .map_err(|e| vector_error(&domain.recommender, e))?;
                (version, Some(state))
            } else {
                (domain.recommender.clone(), None)
            };
            let ids: Vec<u32> = built
                .slots
                .iter()
                .filter(|s| s.role != SlotRole::User)
                .map(|s| s.item)
                .collect();
            let vectors = reader
                .get(&model, &ids)
                .await
                .map_err(|e| vector_error(&domain.recommender, e))?;
            response.slot_dim = vectors.dim as u32;
            response.slot_vectors = slot_vectors(&built.slots, &vectors, user_state.as_deref())?;
            response.recommender_version = vectors.model_version;
            response.vectors_from_cache = vectors.source == Source::Redis;
            let source = match vectors.source {
                Source::Redis => "redis",
                Source::Mixed => "mixed",
                Source::Grpc => "grpc",
            };
            self.state.vector_reads.inc(&[source]);
        }
        Ok(response)
    }

    fn list(&self) -> Result<pb::ListDomainsResponse, ServiceError> {
        let domains = self.state.domains()?;
        Ok(pb::ListDomainsResponse {
            domains: domains
                .by_name
                .values()
                .map(|d| pb::DomainInfo {
                    name: d.name.clone(),
                    item_count: d.catalog.num_items() as u32,
                    template_count: d.builder.templates().len() as u32,
                    recommender: d.recommender.clone(),
                })
                .collect(),
        })
    }
}

/// The slot vectors in slot order: item slots' rows of `items` (read in the order of the
/// non-user slots), the user slot's `user_state`.
fn slot_vectors(
    slots: &[rsllm_prompt::Slot],
    items: &ItemVectors,
    user_state: Option<&[f32]>,
) -> Result<Vec<f32>, ServiceError> {
    let mut values = Vec::with_capacity(slots.len() * items.dim);
    let mut next_item = 0;
    for slot in slots {
        let row = if slot.role == SlotRole::User {
            user_state.filter(|s| s.len() == items.dim).ok_or_else(|| {
                ServiceError::internal(
                    "assembling slot vectors",
                    format!(
                        "a user state of {:?} values for item vectors of width {}",
                        user_state.map(<[f32]>::len),
                        items.dim
                    ),
                )
            })?
        } else {
            let row = items.row(next_item).ok_or_else(|| {
                ServiceError::internal(
                    "assembling slot vectors",
                    format!("no item vector row {next_item}"),
                )
            })?;
            next_item += 1;
            row
        };
        values.extend_from_slice(row);
    }
    Ok(values)
}

/// The embedding-service's own verdicts on ids pass through (our ids came from the catalog, so
/// a NOT_FOUND means the recommender is not loaded there); anything else means it is down.
fn vector_error(recommender: &str, e: ReaderError) -> ServiceError {
    if e.code() == Code::InvalidArgument {
        ServiceError::Invalid(e.to_string())
    } else {
        ServiceError::EmbeddingUnavailable {
            recommender: recommender.to_owned(),
            detail: e.to_string(),
        }
    }
}

#[tonic::async_trait]
impl PromptService for PromptApi {
    async fn build_prompt(
        &self,
        request: Request<pb::BuildPromptRequest>,
    ) -> Result<Response<pb::BuildPromptResponse>, Status> {
        let metrics = &self.state.metrics;
        let span = metrics.span("BuildPrompt", request.metadata());
        let handled = self.build(request.into_inner());
        metrics
            .observe("BuildPrompt", span, handled)
            .await
            .map(Response::new)
    }

    async fn list_domains(
        &self,
        request: Request<pb::ListDomainsRequest>,
    ) -> Result<Response<pb::ListDomainsResponse>, Status> {
        let metrics = &self.state.metrics;
        let span = metrics.span("ListDomains", request.metadata());
        let handled = async { self.list() };
        metrics
            .observe("ListDomains", span, handled)
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use rsllm_prompt::Slot;

    use super::*;

    fn slot(position: usize, item: u32, role: SlotRole) -> Slot {
        Slot {
            position,
            item,
            role,
        }
    }

    #[test]
    fn the_user_state_lands_at_the_user_slot_between_item_rows() {
        let slots = [
            slot(3, 7, SlotRole::History),
            slot(5, 9, SlotRole::History),
            slot(6, 9, SlotRole::User),
            slot(9, 4, SlotRole::Candidate),
        ];
        // Rows of the non-user slots, in their order: items 7, 9, 4.
        let items = ItemVectors {
            model_version: "v".into(),
            dim: 2,
            values: vec![7.0, 7.5, 9.0, 9.5, 4.0, 4.5],
            source: Source::Grpc,
        };
        let values = slot_vectors(&slots, &items, Some(&[0.1, 0.2])).unwrap();
        assert_eq!(values, vec![7.0, 7.5, 9.0, 9.5, 0.1, 0.2, 4.0, 4.5]);
        // A state of the wrong width, or none, is a bug named as such, never a shifted row.
        let err = slot_vectors(&slots, &items, Some(&[0.1])).unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(slot_vectors(&slots, &items, None).is_err());
        let short = ItemVectors {
            values: vec![7.0, 7.5],
            ..items
        };
        assert!(slot_vectors(&slots, &short, Some(&[0.1, 0.2])).is_err());
    }
}
