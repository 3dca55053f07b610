//! A gRPC status for HTTP answers that carry none.
//!
//! A proxy in front of a gRPC server answers for it when it cannot reach it:
//! nginx a `502 Bad Gateway`, HAProxy a `503`, a load balancer a `504` or
//! `429`, each with an HTML page and no `grpc-status`. tonic reads that page
//! as a gRPC message ("received message with invalid compression flag: 60",
//! `<`) and reports INTERNAL, which callers do not retry. gRPC's HTTP to
//! status mapping (grpc/doc/http-grpc-status-mapping.md) says such an answer
//! is UNAVAILABLE for 429/502/503/504, and so on; [`HttpStatusChannel`]
//! replaces it by a trailers-only gRPC response with that code and a message
//! naming the HTTP status, so tonic reports that.

use crate::Code;
use futures::TryFutureExt;
use std::task::{Context, Poll};

/// In the extensions of a response [`HttpStatusChannel`] made up: its
/// `grpc-status` was not sent by the server (nor by a proxy speaking gRPC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synthesized;

/// The gRPC code of an HTTP response status that came without a `grpc-status`.
pub fn code_for_http_status(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// A gRPC channel (or any HTTP service) whose non-200 responses without a
/// `grpc-status`, and 200s whose content-type is not gRPC, become
/// trailers-only responses with the mapped status, marked [`Synthesized`].
/// Every other response passes through untouched.
#[derive(Clone, Debug)]
pub struct HttpStatusChannel<S> {
    inner: S,
}

impl<S> HttpStatusChannel<S> {
    pub fn new(inner: S) -> Self {
        HttpStatusChannel { inner }
    }
}

type Fix<B> = fn(http::Response<B>) -> http::Response<B>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for HttpStatusChannel<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    // The empty body of a made-up response (tonic's `Body::default()` is empty).
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, Fix<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        self.inner.call(req).map_ok(fix::<ResBody> as Fix<ResBody>)
    }
}

/// A 200 whose content-type says it is not gRPC: a web server's page (the
/// endpoint names a web server, or a proxy answers for the server).
fn not_grpc_content(response: &http::Response<impl Sized>) -> Option<String> {
    let ct = response.headers().get(http::header::CONTENT_TYPE)?;
    // `application/grpc`, `application/grpc+proto`, `...; charset=...`, in
    // any case (media types are case-insensitive); not `application/grpc-web`.
    let bytes = ct.as_bytes();
    let grpc = b"application/grpc";
    let is_grpc = bytes.len() >= grpc.len()
        && bytes[..grpc.len()].eq_ignore_ascii_case(grpc)
        && matches!(bytes.get(grpc.len()), None | Some(b'+' | b';' | b' '));
    if is_grpc {
        return None;
    }
    // Printable ASCII without `%`: no percent-encoding needed in a grpc-message.
    let shown: String = String::from_utf8_lossy(ct.as_bytes())
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != '%' || *c == ' ')
        .take(80)
        .collect();
    Some(shown)
}

/// The response tonic should see for `response`.
fn fix<B: Default>(response: http::Response<B>) -> http::Response<B> {
    let status = response.status();
    if response.headers().contains_key("grpc-status") {
        return response;
    }
    // Digits, the canonical reason and a cleaned content-type only: printable
    // ASCII without `%`, so the text needs no percent-encoding.
    let message = if status == http::StatusCode::OK {
        match not_grpc_content(&response) {
            // tonic would read the page as gRPC frames ("invalid compression flag").
            Some(ct) => format!(
                "HTTP 200 with content-type {ct:?}, not gRPC: the endpoint or a proxy on the way \
                 is a web server, not a REAPI server"
            ),
            None => return response,
        }
    } else {
        format!(
            "HTTP {} {} from the server or a proxy on the way, without a gRPC status",
            status.as_u16(),
            status.canonical_reason().unwrap_or("(unknown status)"),
        )
    };
    // Dropping the body (the HTML page) resets its stream, not the connection.
    let (parts, _page) = response.into_parts();
    let mut fixed = http::Response::new(B::default());
    *fixed.extensions_mut() = parts.extensions;
    fixed.extensions_mut().insert(Synthesized);
    let headers = fixed.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        "grpc-status",
        http::HeaderValue::from(code_for_http_status(status) as i32),
    );
    headers.insert(
        "grpc-message",
        http::HeaderValue::from_str(&message).expect("printable ASCII"),
    );
    fixed
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn http_statuses_map_as_grpc_says() {
        for (status, code) in [
            (400, Code::Internal),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::Unimplemented),
            (429, Code::Unavailable),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::Unavailable),
            (500, Code::Unknown),
            (301, Code::Unknown),
            (204, Code::Unknown),
            (418, Code::Unknown),
            (599, Code::Unknown),
        ] {
            let status = http::StatusCode::from_u16(status).unwrap();
            assert_eq!(code_for_http_status(status), code, "{status}");
        }
    }

    /// The response tonic gets for `answer`, and the status it reads from its headers.
    fn seen(answer: http::Response<String>) -> (http::Response<String>, Option<tonic::Status>) {
        let res = fix(answer);
        let status = tonic::Status::from_header_map(res.headers());
        (res, status)
    }

    #[test]
    fn a_page_without_grpc_status_becomes_a_marked_trailers_only_status() {
        let page = http::Response::builder()
            .status(502)
            .header("content-type", "text/html")
            .body("<html>502 Bad Gateway</html>".to_string())
            .unwrap();
        let (res, status) = seen(page);
        assert_eq!(res.status(), http::StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.body(), "");
        assert_eq!(res.extensions().get::<Synthesized>(), Some(&Synthesized));
        let status = status.unwrap();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "HTTP 502 Bad Gateway from the server or a proxy on the way, without a gRPC status"
        );
    }

    #[test]
    fn grpc_answers_and_200s_pass_untouched() {
        let answers = [
            // A trailers-only gRPC answer, even under a non-200 status.
            http::Response::builder()
                .status(503)
                .header("grpc-status", "8")
                .body("x".to_string()),
            http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body("frames".to_string()),
            http::Response::builder()
                .status(200)
                .header("content-type", "application/grpc+proto")
                .body("frames".to_string()),
            http::Response::builder()
                .status(200)
                .header("content-type", "Application/GRPC")
                .body("frames".to_string()),
            // No content-type at all: tonic decides.
            http::Response::builder()
                .status(200)
                .body("frames".to_string()),
        ];
        for answer in answers {
            let answer = answer.unwrap();
            let (status, body) = (answer.status(), answer.body().clone());
            let grpc_status = answer.headers().get("grpc-status").cloned();
            let (res, _) = seen(answer);
            assert_eq!(res.status(), status);
            assert_eq!(res.body(), &body);
            assert_eq!(res.headers().get("grpc-status"), grpc_status.as_ref());
            assert!(res.extensions().get::<Synthesized>().is_none());
        }
    }

    #[test]
    fn content_types_that_are_not_grpc() {
        for ct in [
            "text/html",
            "application/grpc-web",
            "application/grpcfoo",
            "application/json",
        ] {
            let page = http::Response::builder()
                .status(200)
                .header("content-type", ct)
                .body(String::new())
                .unwrap();
            let (_, status) = seen(page);
            assert_eq!(status.map(|s| s.code()), Some(Code::Unknown), "{ct}");
        }
    }

    #[test]
    fn a_200_web_page_is_unknown_naming_its_content_type() {
        let page = http::Response::builder()
            .status(200)
            .header("content-type", "text/html; charset=utf-8%\u{e9}")
            .body("<html>Welcome to nginx!</html>".to_string())
            .unwrap();
        let (res, status) = seen(page);
        assert_eq!(res.body(), "");
        assert_eq!(res.extensions().get::<Synthesized>(), Some(&Synthesized));
        let status = status.unwrap();
        // As gRPC's HTTP mapping has it for 200: no code of its own.
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(
            status.message(),
            "HTTP 200 with content-type \"text/html; charset=utf-8\", not gRPC: the endpoint or a \
             proxy on the way is a web server, not a REAPI server"
        );
    }
}
