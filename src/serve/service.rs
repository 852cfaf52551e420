//! The `stylealign.v1.StyleAlign` service: the state shared by its calls ([`State`]: models,
//! sessions, the [`Engine`], health phase, memory budget) and the handlers, which only translate:
//! proto → validated request ([`validate`]) → admission → [`JobSpec`]; engine events → proto;
//! failures → statuses with `google.rpc` details ([`errors`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument as _;

use super::admission::{self, Admission, Admitted};
use super::config::ServeConfig;
use super::convert::{self, ControlParameters, FieldError, InitParameters, Limits};
use super::engine::{Engine, JobStream, SubmitError};
use super::errors::{self, Reason};
use super::job::{FailCode, JobEvent, JobSpec, Provenance};
use super::layers::Caller;
use super::loras::{LoraError, LoraLibrary, LoraWeight};
use super::metrics::{self as m, Stats};
use super::pb;
use super::pb::style_align_server::StyleAlign;
use super::session::{SessionError, SessionStore, random_u64, shown};
use super::validate::{self, ModelFacts};
use crate::pipeline::img2img::InitImage;
use crate::pipeline::{BatchSpec, ControlSpec, Family, Pipeline, ReferenceImage, SetSpec};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::StyleAligned;

/// The full gRPC name of the service (health checks take it as `service`).
pub const SERVICE_NAME: &str = "stylealign.v1.StyleAlign";

pub(super) const LOADING: u8 = 0;
pub(super) const SERVING: u8 = 1;
pub(super) const DRAINING: u8 = 2;
pub(super) const STOPPED: u8 = 3;

/// A loaded model as the API describes it.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: Arc<str>,
    pub family: Family,
    pub native_size: usize,
    pub size_multiple: usize,
    pub source: String,
    /// SHA-256 of the UNet weights file (lower-case hex; see [`crate::model::hash`]).
    pub sha256: Arc<str>,
    /// For validation (any device's copy).
    pub pipeline: Pipeline,
    /// Format, dtype and prediction type, as ListModels shows them.
    pub details: ModelDetails,
}

/// How a model is stored and what it predicts, as ListModels shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDetails {
    /// `diffusers` (a folder), `single_file`, `embedded`.
    pub format: &'static str,
    /// Element type of the UNet weights as stored: `fp32`, `fp16`, `bf16`.
    pub dtype: &'static str,
    /// `epsilon`, `v_prediction`, `sample`.
    pub prediction_type: &'static str,
    /// Where the prediction type comes from: `config`, `sidecar`, `option`, `family_default`.
    pub prediction_type_source: &'static str,
    /// A single file whose UNet was read from its EMA weights.
    pub ema: bool,
}

/// Decodes a request's init images (fitted to `size`); returns the img2img targets and what the
/// images' parameters record of them.
async fn decode_init_images(
    checked: Vec<validate::CheckedInit>,
    size: (usize, usize),
) -> Result<(Vec<(usize, InitImage)>, Vec<InitParameters>), Status> {
    let mut inits = Vec::with_capacity(checked.len());
    let mut recorded = Vec::with_capacity(checked.len());
    for init in checked {
        recorded.push(InitParameters { index: init.index, image_sha256: init.image.sha256.clone(), strength: init.strength });
        let image = init.image.decode(size).await.map_err(|e| e.status())?;
        inits.push((init.index, InitImage { image, strength: init.strength }));
    }
    Ok((inits, recorded))
}

/// Whether a ControlNet fits a model: its architecture and its images' scale.
pub(super) fn fits(net: &crate::model::controlnet::ControlNet, pipeline: &Pipeline) -> Result<(), String> {
    net.check_fits(&pipeline.unet().config)?;
    let f = net.config.hint_factor();
    if f != pipeline.pixel_factor() {
        return Err(format!("it takes images {f} times the latent, this model's VAE scales by {}", pipeline.pixel_factor()));
    }
    Ok(())
}

pub(super) fn family_to_proto(f: Family) -> pb::Family {
    match f {
        Family::Sd1 => pb::Family::Sd1,
        Family::Sd2 => pb::Family::Sd2,
        Family::Sdxl => pb::Family::Sdxl,
    }
}

/// A served ControlNet (the first device's copy, for validation; each worker uses its own).
#[derive(Clone)]
pub struct ControlNetEntry {
    pub name: Arc<str>,
    pub family: Family,
    pub source: String,
    /// SHA-256 of its weights file (lower-case hex).
    pub sha256: Arc<str>,
    pub net: Arc<crate::model::controlnet::ControlNet>,
}

/// Shared state of the service.
pub struct State {
    pub(super) cfg: ServeConfig,
    pub(super) limits: Limits,
    pub(super) models: RwLock<BTreeMap<Arc<str>, ModelEntry>>,
    pub(super) controlnets: RwLock<BTreeMap<Arc<str>, ControlNetEntry>>,
    pub sessions: SessionStore,
    /// The queue, the workers and the jobs' stop tokens.
    pub engine: Engine,
    pub stats: Arc<Stats>,
    pub(super) health: HealthReporter,
    pub(super) phase: AtomicU8,
    pub(super) active_streams: AtomicUsize,
    /// The memory budget, set once the models are loaded.
    pub(super) admission: std::sync::OnceLock<Arc<Admission>>,
    /// The LoRA folder's LoRAs (`--lora-dir`), set once the models are loaded.
    pub(super) loras: std::sync::OnceLock<Arc<LoraLibrary>>,
}

impl State {
    pub(super) fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    fn check_serving(&self) -> Result<(), Status> {
        match self.phase() {
            SERVING => Ok(()),
            LOADING => Err(errors::error(Reason::WarmingUp, "warming up: models are loading; retry shortly")),
            _ => Err(errors::error(Reason::ShuttingDown, "server is shutting down")),
        }
    }

    /// The common checks of a call on one session: serving, the caller's identity (from the
    /// identity layer), a session id.
    fn session_call<'a, T>(&self, request: &Request<T>, id: &'a str) -> Result<(String, &'a str), Status> {
        self.check_serving()?;
        let owner = Caller::of(request)?.id;
        if id.is_empty() {
            return Err(FieldError::new("session_id", "required").status());
        }
        Ok((owner, id))
    }

    pub(super) fn model(&self, name: &str) -> Option<ModelEntry> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    pub(super) fn controlnet(&self, name: &str) -> Option<ControlNetEntry> {
        self.controlnets.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    pub(super) fn controlnet_names(&self) -> Vec<String> {
        self.controlnets.read().unwrap_or_else(|p| p.into_inner()).keys().map(|k| k.to_string()).collect()
    }

    /// Which served ControlNets fit `model` (or why not), for validation.
    fn controlnets_for(&self, model: &ModelEntry) -> BTreeMap<String, Result<(), String>> {
        let nets = self.controlnets.read().unwrap_or_else(|p| p.into_inner());
        nets.values().map(|c| (c.name.to_string(), fits(&c.net, &model.pipeline))).collect()
    }

    /// The ControlNets as ListModels shows them, each with the served models it fits.
    fn controlnet_list(&self) -> Vec<pb::ControlNetInfo> {
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let nets = self.controlnets.read().unwrap_or_else(|p| p.into_inner());
        nets.values()
            .map(|c| pb::ControlNetInfo {
                name: c.name.to_string(),
                family: family_to_proto(c.family) as i32,
                source: c.source.clone(),
                hash: crate::model::hash::short_hash(&c.sha256).to_string(),
                models: models.values().filter(|m| fits(&c.net, &m.pipeline).is_ok()).map(|m| m.name.to_string()).collect(),
            })
            .collect()
    }

    pub(super) fn model_names(&self) -> Vec<String> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).keys().map(|k| k.to_string()).collect()
    }

    pub(super) async fn set_health(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health.set_service_status(SERVICE_NAME, status).await;
    }

    pub(super) fn update_session_gauge(&self) {
        metrics::gauge!(m::SESSIONS).set(self.sessions.len() as f64);
    }

    /// Checks a PatchModel's `loras` against `model`: known names that fit it, distinct, finite
    /// weights within range, within the LoRA cache budget.
    fn check_loras(&self, model: &ModelEntry, loras: &[pb::LoraWeight]) -> Result<Vec<LoraWeight>, Status> {
        if loras.is_empty() {
            return Ok(Vec::new());
        }
        let Some(lib) = self.loras.get() else {
            return Err(FieldError::new("loras", "this server serves no LoRAs (no --lora-dir)").status());
        };
        if loras.len() > super::loras::MAX_LORAS {
            return Err(
                FieldError::new("loras", format!("{} LoRAs, at most {} per session", loras.len(), super::loras::MAX_LORAS)).status()
            );
        }
        let mut errors = Vec::new();
        let mut out = Vec::with_capacity(loras.len());
        for (i, l) in loras.iter().enumerate() {
            if !l.weight.is_finite() || l.weight.abs() > super::loras::MAX_WEIGHT {
                errors.push(FieldError::new(
                    format!("loras[{i}].weight"),
                    format!("{} is not a number in [-{m}, {m}]", l.weight, m = super::loras::MAX_WEIGHT),
                ));
            }
            if loras[..i].iter().any(|o| o.name == l.name) {
                errors.push(FieldError::new(format!("loras[{i}].name"), format!("{:?} is given twice", convert::bounded(&l.name))));
                continue;
            }
            match lib.check(&model.name, &l.name) {
                Ok(_) => out.push(LoraWeight { name: l.name.clone(), weight: l.weight }),
                Err(e @ LoraError::TooLarge { .. }) => {
                    return Err(errors::error_with(Reason::LoraOverBudget, format!("loras[{i}].name: {e}"), &[("lora", l.name.clone())]));
                }
                Err(LoraError::Unknown(_)) => errors.push(FieldError::new(
                    format!("loras[{i}].name"),
                    format!("unknown LoRA {:?}; served LoRAs: {}", convert::bounded(&l.name), lib.names().join(", ")),
                )),
                Err(e) => errors.push(FieldError::new(format!("loras[{i}].name"), e.to_string())),
            }
        }
        if errors.is_empty() { Ok(out) } else { Err(errors::invalid_fields(&errors)) }
    }

    /// The memory budget (set by [`Server::load`], before SERVING).
    pub fn admission(&self) -> Option<&Arc<Admission>> {
        self.admission.get()
    }

    /// Admits a validated request: its estimated peak against the request limit, its reference
    /// pixels against the pool; the job carries the result.
    fn admit(&self, model: &ModelEntry, v: &validate::ValidRequest, patch: &StyleAligned) -> Result<Admitted, Status> {
        let Some(adm) = self.admission.get() else {
            return Err(errors::error(Reason::WarmingUp, "warming up: models are loading; retry shortly"));
        };
        let cost = model.pipeline.cost_model();
        let shape = admission::shape_of(v, patch);
        let estimate = cost.estimate(&shape);
        let reservation = adm.admit(&estimate)?;
        let max_rows = adm.max_rows(&cost, v.width, v.height, v.steps, self.cfg.max_batch_rows).max(shape.images);
        tracing::debug!(estimate_bytes = estimate.total, reference_bytes = estimate.reference_pixels, max_rows, "admitted");
        Ok(Admitted { reservation, max_rows })
    }

    /// The largest square size a one-image request of this model may ask for.
    fn model_max_size(&self, e: &ModelEntry) -> usize {
        match self.admission.get() {
            Some(a) => a.max_size(&e.pipeline.cost_model(), e.size_multiple, self.limits.max_size, self.limits.default_steps),
            None => self.limits.max_size,
        }
    }

    /// Most rows of a batch at the model's native size.
    fn model_max_rows(&self, e: &ModelEntry) -> usize {
        match self.admission.get() {
            Some(a) => {
                a.max_rows(&e.pipeline.cost_model(), e.native_size, e.native_size, self.limits.default_steps, self.cfg.max_batch_rows)
            }
            None => self.cfg.max_batch_rows,
        }
    }
}

fn count(method: &'static str, code: tonic::Code) {
    metrics::counter!(m::REQUESTS, "method" => method, "code" => code_name(code)).increment(1);
}

/// The canonical gRPC name of a code (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn counted<T>(method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
    match &r {
        Ok(_) => count(method, tonic::Code::Ok),
        Err(s) => {
            count(method, s.code());
            tracing::debug!(method, code = code_name(s.code()), message = s.message(), "request refused");
        }
    }
    r
}

fn session_status(e: SessionError) -> Status {
    match e {
        SessionError::NotFound(_) => errors::error(Reason::SessionNotFound, e.to_string()),
        SessionError::GlobalCap(_) => errors::error(Reason::SessionLimit, e.to_string()),
    }
}

/// Parses a `grpc-timeout` value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `stylealign.v1.StyleAlign` implementation.
#[derive(Clone)]
pub struct Service {
    pub(crate) state: Arc<State>,
}

type GenerateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl StyleAlign for Service {
    async fn patch_model(&self, request: Request<pb::PatchModelRequest>) -> Result<Response<pb::Session>, Status> {
        counted("PatchModel", self.patch_model_inner(request))
    }

    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let r = self.generate_inner(request).await;
        // Successful streams are counted when they end (with their final code).
        if let Err(s) = &r {
            count("Generate", s.code());
            tracing::info!(code = code_name(s.code()), message = s.message(), "generate refused");
        }
        r
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Result<Response<pb::Session>, Status> {
        counted(
            "GetSession",
            (|| {
                let st = &self.state;
                let (owner, id) = st.session_call(&request, &request.get_ref().session_id)?;
                let s = st.sessions.get(&owner, id).map_err(session_status)?;
                let levels = st.model(&s.model).map(|m| m.pipeline.unet().levels());
                Ok(Response::new(convert::session_to_proto(&s, s.idle_ttl, levels.as_deref())))
            })(),
        )
    }

    async fn release_session(&self, request: Request<pb::ReleaseSessionRequest>) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
        counted(
            "ReleaseSession",
            (|| {
                let st = &self.state;
                let (owner, id) = st.session_call(&request, &request.get_ref().session_id)?;
                st.sessions.release(&owner, id).map_err(session_status)?;
                st.update_session_gauge();
                tracing::info!(client = %owner, session = %shown(id), "session released");
                Ok(Response::new(pb::ReleaseSessionResponse {}))
            })(),
        )
    }

    async fn list_loras(&self, request: Request<pb::ListLorasRequest>) -> Result<Response<pb::ListLorasResponse>, Status> {
        counted(
            "ListLoras",
            (|| {
                let st = &self.state;
                st.check_serving()?;
                Caller::of(&request)?;
                Ok(Response::new(match st.loras.get() {
                    Some(lib) => pb::ListLorasResponse { loras: lib.to_proto(), cache_budget_bytes: lib.budget() },
                    None => pb::ListLorasResponse { loras: Vec::new(), cache_budget_bytes: st.cfg.lora_cache_bytes },
                }))
            })(),
        )
    }

    async fn list_models(&self, request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        counted(
            "ListModels",
            (|| {
                let st = &self.state;
                st.check_serving()?;
                Caller::of(&request)?;
                let admission = st.admission.get();
                let models = st
                    .models
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|e| pb::ModelInfo {
                        name: e.name.to_string(),
                        family: family_to_proto(e.family) as i32,
                        hash: crate::model::hash::short_hash(&e.sha256).to_string(),
                        native_width: e.native_size as u32,
                        native_height: e.native_size as u32,
                        size_multiple: e.size_multiple as u32,
                        source: e.source.clone(),
                        max_size: st.model_max_size(e) as u32,
                        max_batch_rows: st.model_max_rows(e) as u32,
                        format: e.details.format.to_string(),
                        dtype: e.details.dtype.to_string(),
                        prediction_type: e.details.prediction_type.to_string(),
                        prediction_type_source: e.details.prediction_type_source.to_string(),
                        ema: e.details.ema,
                    })
                    .collect();
                let controlnets = st.controlnet_list();
                let l = &st.limits;
                Ok(Response::new(pb::ListModelsResponse {
                    models,
                    controlnets,
                    samplers: SamplerKind::ALL.iter().map(|s| s.as_str().to_string()).collect(),
                    max_prompts: l.max_prompts as u32,
                    max_steps: l.max_steps as u32,
                    max_size: l.max_size as u32,
                    default_steps: l.default_steps as u32,
                    default_guidance_scale: l.default_guidance,
                    memory_budget_bytes: admission.map_or(0, |a| a.budget()),
                }))
            })(),
        )
    }
}

impl Service {
    fn patch_model_inner(&self, request: Request<pb::PatchModelRequest>) -> Result<Response<pb::Session>, Status> {
        let st = &self.state;
        st.check_serving()?;
        let owner = Caller::of(&request)?.id;
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(FieldError::new("model", format!("required; loaded models: {}", st.model_names().join(", "))).status());
        }
        let Some(model) = st.model(&req.model) else {
            let e = FieldError::new(
                "model",
                format!("unknown model {:?}; loaded models: {}", convert::bounded(&req.model), st.model_names().join(", ")),
            );
            return Err(errors::invalid_fields_with(Reason::UnknownModel, &[e]));
        };
        let levels = model.pipeline.unet().levels();
        let (patch, scope) = match (validate::patch(&req), validate::scope(&req, &levels)) {
            (Ok(patch), Ok(scope)) => (patch, scope),
            (patch, scope) => {
                let e: Vec<FieldError> = patch.err().into_iter().chain(scope.err()).flatten().collect();
                return Err(errors::invalid_fields(&e));
            }
        };
        let loras = st.check_loras(&model, &req.loras)?;
        let s = st.sessions.create_with_loras(&owner, &model.name, patch, scope, loras).map_err(session_status)?;
        st.update_session_gauge();
        tracing::info!(client = %owner, session = %s.short_id(), model = %s.model, options = ?s.patch, scope = ?s.scope, "session created");
        Ok(Response::new(convert::session_to_proto(&s, s.idle_ttl, Some(&levels))))
    }

    /// Decodes a request's control images (fitted to `size`) and binds each control to its
    /// ControlNet; returns the controls and what the images' parameters record of them.
    async fn decode_controls(
        &self,
        checked: Vec<validate::CheckedControl>,
        size: (usize, usize),
    ) -> Result<(Vec<ControlSpec>, Vec<ControlParameters>), Status> {
        let mut controls = Vec::with_capacity(checked.len());
        let mut recorded = Vec::with_capacity(checked.len());
        for (k, c) in checked.into_iter().enumerate() {
            let entry = self.state.controlnet(&c.model).ok_or_else(|| {
                FieldError::new(format!("controls[{k}].model"), format!("{:?} is no longer served", convert::bounded(&c.model))).status()
            })?;
            let images_sha256 = c.images.iter().map(|i| i.sha256.clone()).collect();
            let mut images = Vec::with_capacity(c.images.len());
            for img in c.images {
                images.push(img.decode(size).await.map_err(|e| e.status())?);
            }
            recorded.push(ControlParameters {
                model: c.model,
                model_sha256: entry.sha256.to_string(),
                images_sha256,
                conditioning_scale: c.conditioning_scale,
                start: c.start,
                end: c.end,
            });
            controls.push(ControlSpec { net: entry.net, images, conditioning_scale: c.conditioning_scale, start: c.start, end: c.end });
        }
        Ok((controls, recorded))
    }

    async fn generate_inner(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let st = &self.state;
        st.check_serving()?;
        let owner = Caller::of(&request)?.id;
        let timeout =
            match request.metadata().get("grpc-timeout") {
                Some(v) => Some(v.to_str().ok().and_then(parse_grpc_timeout).ok_or_else(|| {
                    errors::invalid_metadata("grpc-timeout", "not a timeout (1 to 8 digits and a unit: H, M, S, m, u, n)")
                })?),
                None => None,
            };
        let deadline = timeout.map(|t| arrived + t);
        let req = request.into_inner();
        if req.session_id.is_empty() {
            return Err(FieldError::new("session_id", "required (from PatchModel)").status());
        }
        let session = st.sessions.get(&owner, &req.session_id).map_err(session_status)?;
        let model = st
            .model(&session.model)
            .ok_or_else(|| errors::error(Reason::ModelNotLoaded, format!("the session's model {:?} is no longer loaded", session.model)))?;
        // A session adopted from its token on a replica that serves other LoRAs.
        for l in &session.loras {
            let served = st
                .loras
                .get()
                .ok_or_else(|| LoraError::Unknown(l.name.clone()))
                .and_then(|lib| lib.check(&model.name, &l.name).map(|_| ()));
            if let Err(e) = served {
                return Err(FieldError::new("session_id", format!("the session's LoRA cannot be used on this server: {e}")).status());
            }
        }
        let facts = ModelFacts {
            native_size: model.native_size,
            size_multiple: model.size_multiple,
            sdxl: model.family == Family::Sdxl,
            controlnets: st.controlnets_for(&model),
        };
        let mut v = validate::generate(req, &facts, &st.limits, random_u64).map_err(|e| errors::invalid_fields(&e))?;
        // Admission before the reference image is decoded: its pixels are reserved first.
        let mut admitted = st.admit(&model, &v, &session.patch)?;
        let size = (v.width, v.height);
        let reference = match v.reference.take() {
            Some(r) => Some(validate::decode_reference(r, size).await.map_err(|e| e.status())?),
            None => None,
        };
        let (init_images, init_recorded) = decode_init_images(std::mem::take(&mut v.init_images), size).await?;
        let (controls, control_recorded) = self.decode_controls(std::mem::take(&mut v.controls), size).await?;
        let held = reference.iter().map(|r| r.image.rgb.len()).chain(init_images.iter().map(|(_, i)| i.image.rgb.len())).sum::<usize>()
            + controls.iter().flat_map(|c| c.images.iter().map(|i| i.rgb.len())).sum::<usize>();
        admitted.reservation.shrink_to(held as u64);
        let batch = BatchSpec {
            width: v.width,
            height: v.height,
            steps: v.steps,
            guidance: v.guidance,
            sampler: v.sampler,
            patch: Some(session.patch),
            scope: session.scope.clone(),
            size_conditioning: v.size_conditioning,
        };
        let reference_sha256 = reference.as_ref().map(|r| r.sha256.clone());
        let reference = reference.map(|r| ReferenceImage {
            image: r.image,
            caption: r.caption,
            offset: r.offset,
            guidance: r.guidance,
            scope: session.id.to_string(),
        });
        let set = SetSpec {
            prompts: v.prompts,
            negative_prompt: v.negative_prompt,
            seed: v.seed,
            reference,
            init_images,
            controls,
            // Bound by the worker to its device's loaded LoRAs (`JobSpec::loras`).
            loras: Vec::new(),
        };
        validate::with_model(&model.pipeline, &batch, &set).map_err(|e| errors::invalid_fields(&e))?;

        let id = st.engine.next_id();
        let span = tracing::info_span!(target: crate::telemetry::TARGET, "Generate", job = id as i64, rows = set.prompts.len() as i64, steps = v.steps as i64, code = tracing::field::Empty);
        let rows = set.prompts.len();
        let spec = JobSpec {
            id,
            priority: v.priority,
            model: model.name.clone(),
            provenance: Provenance { model: model.name.clone(), family: model.family.as_str(), model_sha256: model.sha256.clone() },
            batch,
            set,
            reference_sha256,
            init_images: init_recorded,
            controls: control_recorded,
            loras: session
                .loras
                .iter()
                .map(|l| super::convert::LoraParameters {
                    name: l.name.clone(),
                    weight: l.weight,
                    sha256: st
                        .loras
                        .get()
                        .and_then(|lib| lib.files().find(|f| f.name == l.name))
                        .map_or(String::new(), |f| f.sha256.clone()),
                })
                .collect(),
            deadline,
            span: span.clone(),
            admitted,
        };
        let job = st.engine.submit(spec).map_err(|e| match e {
            SubmitError::Full { capacity } => {
                errors::error_with(Reason::QueueFull, e.to_string(), &[("queue_capacity", capacity.to_string())])
            }
            SubmitError::Closed | SubmitError::NoDevice => errors::error(Reason::ShuttingDown, e.to_string()),
            SubmitError::DeadlineExceeded => errors::error(Reason::Deadline, e.to_string()),
        })?;
        tracing::info!(job = id, client = %owner, session = %session.short_id(), rows, steps = v.steps, priority = v.priority.as_str(), timeout_ms = timeout.map(|t| t.as_millis() as u64), "generate queued");
        let (out_tx, out_rx) = mpsc::channel(16);
        st.active_streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(forward(self.state.clone(), job, out_tx, arrived).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// Translates a job's events into its response stream. The client leaving (or the stream's
/// end) drops the [`JobStream`], which cancels the job.
async fn forward(st: Arc<State>, mut job: JobStream, out: mpsc::Sender<Result<pb::GenerateResponse, Status>>, arrived: Instant) {
    use pb::generate_response::Event;
    let id = job.id();
    let code = loop {
        let event = tokio::select! {
            biased;
            e = job.next() => e,
            _ = out.closed() => break tonic::Code::Cancelled,
        };
        let msg = match event {
            Some(JobEvent::Queued { position, depth }) => {
                Ok(Event::Queued(pb::Queued { position: position as u32, queue_depth: depth as u32 }))
            }
            Some(JobEvent::Started { batch_rows, batch_sets, queue_time }) => Ok(Event::Started(pb::Started {
                batch_rows: batch_rows as u32,
                batch_sets: batch_sets as u32,
                queue_seconds: queue_time.as_secs_f64(),
            })),
            Some(JobEvent::Progress { step, total }) => Ok(Event::Progress(pb::Progress { step: step as u32, total_steps: total as u32 })),
            Some(JobEvent::Image(img)) => Ok(Event::Image(pb::GeneratedImage {
                index: img.index as u32,
                prompt: img.prompt,
                width: img.width as u32,
                height: img.height as u32,
                seed: img.seed,
                png: img.png,
                parameters: img.parameters,
            })),
            Some(JobEvent::Done) => break tonic::Code::Ok,
            Some(JobEvent::Failed { code, message }) => Err(match code {
                FailCode::InvalidArgument => errors::error(Reason::InvalidField, message),
                FailCode::DeadlineExceeded => errors::error(Reason::Deadline, message),
                FailCode::Cancelled => errors::error(Reason::Cancelled, message),
                FailCode::Unavailable => errors::error(Reason::ShuttingDown, message),
                FailCode::ResourceExhausted => errors::error(Reason::LoraOverBudget, message),
                FailCode::Internal => errors::error(Reason::Internal, message),
            }),
            None => Err(errors::error(Reason::Internal, "the job ended without a result")),
        };
        match msg {
            Ok(event) => {
                if out.send(Ok(pb::GenerateResponse { event: Some(event) })).await.is_err() {
                    break tonic::Code::Cancelled;
                }
            }
            Err(status) => {
                let code = status.code();
                let _ = out.send(Err(status)).await;
                break code;
            }
        }
    };
    // A job that has not ended (client gone) is cancelled here.
    drop(job);
    let job = id;
    count("Generate", code);
    tracing::Span::current().record("code", code_name(code));
    if code == tonic::Code::Ok {
        metrics::histogram!(m::GENERATE_TIME).record(arrived.elapsed().as_secs_f64());
    }
    tracing::info!(job, code = code_name(code), elapsed_ms = arrived.elapsed().as_millis() as u64, "generate finished");
    st.active_streams.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
