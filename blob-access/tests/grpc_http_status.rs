//! A proxy's HTML error page instead of a gRPC answer (nginx's 502, HAProxy's
//! 503): the `grpc` node reports the code gRPC maps that HTTP status to, with
//! a message naming it, not a decode error of the HTML; a web server's 200
//! page says it is not gRPC.

use blob_access::grpc::{GrpcBlobAccess, GrpcConfig, GrpcConnection};
use blob_access::{util, BlobAccess, Code, Digest, ReadRange};
use bytes::Bytes;

/// An HTTP/2 server on loopback that answers every request with `status`
/// and an HTML page, as a proxy with no upstream does.
async fn html_server(status: u16) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_, mut respond))) = conn.accept().await {
                    let head = http::Response::builder()
                        .status(status)
                        .header("content-type", "text/html")
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(head, false) {
                        let page = "<html><body><h1>502 Bad Gateway</h1></body></html>";
                        let _ = send.send_data(Bytes::from(page), true);
                    }
                }
            });
        }
    });
    addr
}

/// Each call of a `grpc` node to a server answering with `status` and an
/// HTML page fails with `code`, its message containing `says`.
async fn every_call_fails(status: u16, code: Code, says: &str) {
    let addr = html_server(status).await;
    let cfg: GrpcConfig =
        serde_json::from_value(serde_json::json!({"endpoint": format!("grpc://{addr}")})).unwrap();
    let ba = GrpcBlobAccess::new(GrpcConnection::new("remote", &cfg).unwrap());
    let data = Bytes::from_static(b"some blob");
    let d = Digest::of(&data);
    let get = util::read_to_bytes(&ba, &d, ReadRange::FULL, 1 << 20).await;
    let put = ba.put(&d, util::once(data.clone())).await;
    let find_missing = ba.find_missing(std::slice::from_ref(&d)).await;
    for (call, err) in [
        ("get", get.unwrap_err()),
        ("put", put.unwrap_err()),
        ("find_missing", find_missing.unwrap_err()),
    ] {
        assert_eq!(err.code(), code, "{call}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(says), "{call}: {msg}");
        assert!(!msg.contains("compression flag"), "{call}: {msg}");
    }
}

#[tokio::test]
async fn a_proxys_502_page_is_unavailable_naming_the_http_status() {
    every_call_fails(502, Code::Unavailable, "HTTP 502 Bad Gateway").await;
}

#[tokio::test]
async fn a_web_server_s_200_page_is_unknown_naming_its_content_type() {
    let says = "HTTP 200 with content-type \"text/html\", not gRPC";
    every_call_fails(200, Code::Unknown, says).await;
}
