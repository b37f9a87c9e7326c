//! Several berth nodes over one PostgreSQL database (`[metadata] kind = "postgres"`): what one
//! node writes, every node acts on at once: users turn auth on everywhere, a token of one node
//! is good at every node, registries route everywhere, and a scheduled job runs on one node
//! only.

mod common;

use std::time::{Duration, SystemTime};

use common::server::TestServer;
use reqwest::{Method, StatusCode};
use serde_json::json;

fn metadata(url: &str) -> String {
    format!("[metadata]\nkind = \"postgres\"\nurl = {url:?}\n")
}

/// Nodes over one fresh database.
async fn nodes(n: usize, extra: &str) -> Vec<TestServer> {
    let url = berth::testbed::postgres().database().await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::start(&format!("{}{extra}", metadata(&url))).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_node_writes_every_node_acts_on_at_once() {
    let ns = nodes(2, "").await;
    let (a, b) = (&ns[0], &ns[1]);
    // auth = auto: open until the first user exists, anywhere.
    assert_eq!(b.get("/v2/").await.status(), StatusCode::OK);
    let (id, secret) = a.user("root", berth::auth::Role::Admin, &[]);
    assert_eq!(
        b.get("/v2/").await.status(),
        StatusCode::UNAUTHORIZED,
        "a user created on one node turns auth on at the others at once"
    );
    // A token issued by node A is accepted by node B: one signing key in the database.
    let r = a
        .client
        .get(a.url("/service/token?service=berth&scope=repository:library/app:pull"))
        .basic_auth(&id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token = r.json::<serde_json::Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = b
        .client
        .get(b.url("/v2/library/app/tags/list"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "token accepted, no such repository"
    );
    // A registry created through node B routes on node A at once.
    let r = b
        .client
        .post(b.url("/api/v1/registries"))
        .basic_auth(&id, Some(&secret))
        .json(&json!({"name": "team", "type": "normal"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    assert!(a.app().store.registry("team").is_some());
    // A user deleted through node B: node A refuses its key at once.
    let (bob, bob_secret) = a.user("bob", berth::auth::Role::Viewer, &[]);
    let as_bob = |s: &TestServer| {
        s.client
            .get(s.url("/v2/"))
            .basic_auth(&bob, Some(&bob_secret))
            .send()
    };
    assert_eq!(as_bob(a).await.unwrap().status(), StatusCode::OK);
    let r = b
        .client
        .delete(b.url("/api/v1/users/bob"))
        .basic_auth(&id, Some(&secret))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    assert_eq!(as_bob(a).await.unwrap().status(), StatusCode::UNAUTHORIZED);
}

async fn cleanup_executions(s: &TestServer) -> usize {
    let (status, list) = s
        .api(Method::GET, "/registries/library/cleanup/executions", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    list["items"].as_array().unwrap().len()
}

/// Every node's scheduler ticks over the same window at once; the nodes that started a run.
async fn tick_all(ns: &[TestServer], since: SystemTime, now: SystemTime) -> Vec<usize> {
    let ticks = ns.iter().map(|s| {
        let app = s.app();
        async move { berth::scheduler::start_due(&app, since, now).await }
    });
    futures_util::future::join_all(ticks)
        .await
        .iter()
        .enumerate()
        .filter(|(_, started)| started.iter().any(|j| j == "cleanup/library"))
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_cleanup_runs_on_one_node_and_again_once_after_that_node_is_gone() {
    let mut ns = nodes(3, "").await;
    let every_minute = json!({"schedule": {"type": "custom", "cron": "* * * * *"}});
    let (status, body) = ns[0]
        .api(
            Method::PUT,
            "/registries/library/cleanup",
            Some(every_minute),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let now = SystemTime::now();
    let ran = tick_all(&ns, now - Duration::from_secs(61), now).await;
    assert_eq!(ran.len(), 1, "one node ran it: {ran:?}");
    assert_eq!(cleanup_executions(&ns[1]).await, 1);
    // The node that ran it is gone; at the next due time one of the others runs it, once.
    ns.remove(ran[0]).server.take().unwrap().shutdown().await;
    let later = now + Duration::from_secs(60);
    let ran = tick_all(&ns, now, later).await;
    assert_eq!(ran.len(), 1, "once more, on one node: {ran:?}");
    assert_eq!(cleanup_executions(&ns[0]).await, 2);
}
