//! `berth_webhook_queue_depth` by value. The gauge is process-wide and every server of a test
//! binary writes it, so it can only be checked exactly in a binary of its own: this one runs a
//! single server, and the gauge's value is what that server's queue holds.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth::events::webhooks::{DeliveryStatus, WebhookKind, WebhookSpec};
use berth::events::EventKind;
use common::doubles::{empty_body, wait_until, LoopbackServer};
use common::server::TestServer;

const GAUGE: &str = "berth_webhook_queue_depth";

async fn gauge_reaches(s: &TestServer, want: f64) -> f64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let v = s.metric(GAUGE, &[]).await;
        if v == want || std::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_gauge_shows_the_queued_deliveries() {
    let delivered = Arc::new(AtomicUsize::new(0));
    let counter = delivered.clone();
    let rx = LoopbackServer::start(move |_req| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            http::Response::builder()
                .status(200)
                .body(empty_body())
                .unwrap()
        }
    });
    // Loopback receivers need the egress allowance (tests/egress.rs checks the refusal).
    let s = TestServer::start(
        "[egress]\nallowed_networks = [\"127.0.0.0/8\"]\n[webhooks]\nallowed_ports = []\n\
         retry_initial = \"50ms\"\nretry_max = \"400ms\"\nqueue_size = 3\nmax_attempts = 1000\n",
    )
    .await;
    let policy = s
        .app()
        .events
        .webhooks
        .create(
            "library",
            WebhookSpec {
                name: "gauge".into(),
                events: vec![EventKind::PushArtifact],
                target: format!("{}/hook", rx.url()),
                kind: WebhookKind::Http,
                auth_header: None,
                secret: None,
                enabled: true,
            },
        )
        .await
        .unwrap();
    let log = || {
        common::block(
            s.app()
                .events
                .webhooks
                .deliveries(&policy.registry, &policy.id, 1000),
        )
        .unwrap()
    };
    assert_eq!(s.metric(GAUGE, &[]).await, 0.0, "nothing queued yet");
    rx.stop();
    const N: usize = 8;
    for i in 0..N {
        s.push_image("library/app", &format!("t{i}"), &format!("seed{i}"))
            .await;
    }
    assert!(
        wait_until(Duration::from_secs(15), || log().len() == N).await,
        "every delivery logged"
    );
    let pending = log()
        .iter()
        .filter(|d| d.status == DeliveryStatus::Pending)
        .count();
    assert!((2..=4).contains(&pending), "{pending} pending: {:?}", log());
    // The receiver is down: one delivery is in flight (retrying), the other pending ones wait
    // in the queue, and the gauge says how many.
    let want = (pending - 1) as f64;
    assert_eq!(gauge_reaches(&s, want).await, want, "queued deliveries");
    rx.restart();
    assert!(
        wait_until(Duration::from_secs(15), || delivered.load(Ordering::SeqCst)
            == pending)
        .await,
        "the pending deliveries arrive"
    );
    assert_eq!(gauge_reaches(&s, 0.0).await, 0.0, "the queue drained");
}
