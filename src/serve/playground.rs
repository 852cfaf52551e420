//! The browser playground: one page at `/` on the API port that calls `stylealign.v1.StyleAlign`
//! over gRPC-Web from the same origin (so no CORS). The page and style sheet are `web/src/`'s; the
//! script is built from `web/` (generated protobuf code + connect-web, bundled by esbuild;
//! `web/build.sh`) and committed as `assets/playground/app.js`. All three are embedded in the
//! binary. `--no-playground` turns it off.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../../web/src/index.html");
const APP_JS: &str = include_str!("../../assets/playground/app.js");
const STYLE_CSS: &str = include_str!("../../web/src/style.css");

/// The page only talks to its own origin; images are shown and downloaded from `blob:` URLs
/// (which may also be fetched, e.g. to read a downloaded PNG back).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The playground's routes: `/`, `/playground/app.js`, `/playground/style.css` (GET and HEAD).
pub fn router() -> axum::Router {
    axum::Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route("/playground/app.js", get(|| asset("text/javascript; charset=utf-8", APP_JS)))
        .route("/playground/style.css", get(|| asset("text/css; charset=utf-8", STYLE_CSS)))
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidate: a new binary may carry a new page.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}
