//! `stylealign demo`: an in-process server on the embedded model, one style-aligned set and the
//! same set with the patch disabled, written as PNGs and a contact sheet.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use super::{self as client, Identity};
use crate::serve::convert::Limits;
use crate::serve::pb;
use crate::serve::session::SessionSecret;
use crate::serve::{ServeConfig, Server};

/// `stylealign demo` options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 12)]
    pub steps: u32,
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Runs server and client in one process on the embedded model; writes PNGs and a contact sheet.
pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let cfg = ServeConfig { listen: "127.0.0.1:0".parse()?, admin_listen: None, session_secret: Some(SessionSecret::random()), limits: Limits { default_steps: a.steps.max(1) as usize, ..ServeConfig::default().limits }, ..ServeConfig::default() };
    let server = Server::bind(cfg).await?;
    server.load().await?;
    let addr = server.addr().to_string();
    println!("demo server on {addr} (embedded tiny model)");
    let who = Identity::client("demo");
    let mut c = client::connect(&addr).await?;
    let models = c.list_models(who.request(pb::ListModelsRequest {}, None)).await?.into_inner();
    for m in &models.models {
        println!("model {} ({:?}, native {}x{}, multiple {})", m.name, pb::Family::try_from(m.family).unwrap_or_default(), m.native_width, m.native_height, m.size_multiple);
    }
    let sets: [(&str, pb::PatchModelRequest, Vec<&str>); 2] = [
        ("aligned", pb::PatchModelRequest { model: "tiny".into(), ..Default::default() }, vec!["a house, flat vector art", "a tree, flat vector art", "a car, flat vector art", "a boat, flat vector art"]),
        (
            "unaligned",
            pb::PatchModelRequest { model: "tiny".into(), share_norm: pb::ShareNorm::Disabled as i32, share_attn: pb::ShareAttn::Disabled as i32, scale: Some(0.0), advanced: None },
            vec!["a house, flat vector art", "a tree, flat vector art", "a car, flat vector art", "a boat, flat vector art"],
        ),
    ];
    let mut all: Vec<Vec<u8>> = Vec::new();
    for (name, patch, prompts) in sets {
        let session = c.patch_model(who.request(patch, None)).await?.into_inner();
        let req = pb::GenerateRequest {
            session_id: session.session_id.clone(),
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            seed: Some(a.seed),
            steps: a.steps,
            width: a.size,
            height: a.size,
            ..Default::default()
        };
        let r = client::generate(&mut c, &who, req, Some(Duration::from_secs(300)), |_| {}).await.with_context(|| format!("Generate ({name})"))?;
        for p in client::write_images(&a.out, name, &r.images)? {
            println!("{}", p.display());
        }
        all.extend(r.images.into_iter().map(|i| i.png));
        c.release_session(who.request(pb::ReleaseSessionRequest { session_id: session.session_id }, None)).await?;
    }
    let refs: Vec<&[u8]> = all.iter().map(Vec::as_slice).collect();
    let sheet = client::contact_sheet(&refs, 4)?;
    let path = a.out.join("contact_sheet.png");
    std::fs::write(&path, sheet).with_context(|| path.display().to_string())?;
    println!("{} (row 1: style-aligned; row 2: patch disabled)", path.display());
    server.shutdown().await;
    Ok(())
}

