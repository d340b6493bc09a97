//! APNs and FCM cannot be reached from these machines: the real provider
//! code is tested against stand-ins (`testkit::push_standins`) that check
//! each request as the real services document it (HTTP/2 for APNs, the
//! ES256 provider token's signature, the headers, the OAuth2 JWT grant's
//! RS256 signature and claims for FCM, the bodies) and answer with the
//! services' own success and error bodies: a push to each, one token each
//! that the service calls gone (pruned), a 429 with `Retry-After` (retried
//! and sent), and an expired credential (made anew and sent).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use testkit::gateway::{Client, Gateway, WAIT};
use testkit::push_standins::{Recorded, StandIn};

const KEY_ID: &str = "ABC123DEFG";
const TEAM_ID: &str = "TEAM123456";
const TOPIC: &str = "org.example.chat";
const PROJECT: &str = "chat-test";
const CLIENT_EMAIL: &str = "push@chat-test.iam.gserviceaccount.com";

struct Node {
    gateway: Gateway,
    writer_metrics: SocketAddr,
    apns: StandIn,
    fcm: StandIn,
    _dir: tempfile::TempDir,
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?}");
}

fn start_node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    // APNs: the team's .p8 (a P-256 key in PKCS#8) and its public half.
    let apns_key = rcgen::KeyPair::generate().unwrap();
    let p8 = dir.path().join("AuthKey.p8");
    std::fs::write(&p8, apns_key.serialize_pem()).unwrap();
    let apns = StandIn::apns(&apns_key.public_key_pem(), KEY_ID, TEAM_ID);
    // FCM: a service account's RSA key, in a key file as Google issues it.
    let rsa = dir.path().join("rsa.pem");
    let rsa_public = dir.path().join("rsa.pub.pem");
    openssl(&[
        "genpkey",
        "-quiet",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        rsa.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        rsa.to_str().unwrap(),
        "-pubout",
        "-out",
        rsa_public.to_str().unwrap(),
    ]);
    let fcm = StandIn::fcm(
        &std::fs::read_to_string(&rsa_public).unwrap(),
        CLIENT_EMAIL,
        PROJECT,
    );
    let account = dir.path().join("service-account.json");
    std::fs::write(
        &account,
        json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "0123",
            "private_key": std::fs::read_to_string(&rsa).unwrap(),
            "client_email": CLIENT_EMAIL,
            "token_uri": format!("{}/token", fcm.url),
        })
        .to_string(),
    )
    .unwrap();
    // Both stand-ins' CAs, trusted for push only.
    let cas = dir.path().join("cas.pem");
    let both = std::fs::read_to_string(&apns.ca_file).unwrap()
        + &std::fs::read_to_string(&fcm.ca_file).unwrap();
    std::fs::write(&cas, both).unwrap();

    let writer_metrics: SocketAddr = format!("127.0.0.1:{}", testkit::free_port())
        .parse()
        .unwrap();
    let writer_args = [
        "--push-apns-key",
        p8.to_str().unwrap(),
        "--push-apns-key-id",
        KEY_ID,
        "--push-apns-team-id",
        TEAM_ID,
        "--push-apns-url",
        &apns.url,
        "--push-apns-sandbox-url",
        &apns.url,
        "--push-fcm-service-account",
        account.to_str().unwrap(),
        "--push-fcm-url",
        &fcm.url,
        "--push-ca-file",
        cas.to_str().unwrap(),
        "--push-ack-wait-ms",
        "300",
        "--push-coalesce-ms",
        "1000",
        "--metrics-listen",
        &writer_metrics.to_string(),
    ]
    .map(|arg| format!("--storage-writer-arg={arg}"));
    let flags: Vec<&str> = writer_args.iter().map(String::as_str).collect();
    Node {
        gateway: Gateway::start(&flags),
        writer_metrics,
        apns,
        fcm,
        _dir: dir,
    }
}

fn writer_metric(node: &Node, name: &str, labels: &[&str]) -> u64 {
    let (_, body) =
        testkit::gateway::http_get(node.writer_metrics, "/metrics").expect("metrics answer");
    testkit::gateway::metric_in(&body, name, labels)
}

fn wait_writer_metric(node: &Node, name: &str, labels: &[&str], at_least: u64) {
    let deadline = std::time::Instant::now() + WAIT;
    while writer_metric(node, name, labels) < at_least {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} < {at_least}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Registers `push` for `user`'s phone and disconnects it.
fn register_and_leave(gateway: &Gateway, user: &str, push: Value) {
    let mut client = gateway.connect(user, "phone");
    client.send(json!({"type": "push_register", "id": "r", "push": push}));
    client.recv_type("push_registered");
    client.close();
}

fn apns_token(seed: u8) -> String {
    format!("{seed:02x}").repeat(32)
}

fn send(alice: &mut Client, id: &str, to: &str) {
    alice.send_message(id, to, "ciphertext the server cannot read");
    alice.recv_type("sent");
}

fn to_device(token: &str) -> impl Fn(&Recorded) -> bool + '_ {
    move |r: &Recorded| r.path.ends_with(token) && r.status == 200
}

#[test]
fn apns_and_fcm_get_well_formed_pushes_and_their_errors_are_handled() {
    let node = start_node();
    let gateway = &node.gateway;
    register_and_leave(
        gateway,
        "bob",
        json!({"kind": "apns", "token": apns_token(1), "topic": TOPIC}),
    );
    register_and_leave(
        gateway,
        "dave",
        json!({"kind": "apns", "token": apns_token(2), "topic": TOPIC, "sandbox": true}),
    );
    register_and_leave(
        gateway,
        "carol",
        json!({"kind": "fcm", "token": "carol:APA91b-token"}),
    );
    register_and_leave(
        gateway,
        "erin",
        json!({"kind": "fcm", "token": "erin:APA91b-token"}),
    );
    node.apns.unregister(&apns_token(2));
    node.fcm.unregister("erin:APA91b-token");

    let mut alice = gateway.connect("alice", "phone");
    for to in ["bob", "dave", "carol", "erin"] {
        send(&mut alice, &format!("to-{to}"), to);
    }

    // APNs: HTTP/2, a verified provider token, the documented headers, no content.
    let bob = node.apns.wait_requests(1, to_device(&apns_token(1)));
    let request = &bob[0];
    assert_eq!(request.version, "HTTP/2.0");
    assert_eq!(request.headers["apns-push-type"], "alert");
    assert_eq!(request.headers["apns-priority"], "10");
    assert_eq!(request.headers["apns-topic"], TOPIC);
    assert!(request.headers["apns-collapse-id"].len() <= 64);
    let expiration: u64 = request.headers["apns-expiration"].parse().unwrap();
    assert!(
        expiration > testkit::gateway::unix_s(),
        "expires in the future"
    );
    assert_eq!(request.body["chat"]["type"], "new_messages");
    assert_eq!(request.body["chat"]["count"], 1);
    assert!(
        !request.body.to_string().contains("ciphertext"),
        "content-free"
    );
    assert!(request.body["chat"].get("from").is_none());

    // FCM: an access token from the JWT grant, then a data message.
    let carol = node.fcm.wait_requests(1, |r| {
        r.path.ends_with("messages:send")
            && r.body["message"]["token"] == "carol:APA91b-token"
            && r.status == 200
    });
    let message = &carol[0].body["message"];
    assert_eq!(message["data"]["count"], "1");
    assert_eq!(message["data"]["type"], "new_messages");
    assert_eq!(message["android"]["priority"], "HIGH");
    assert!(message["android"]["collapse_key"].is_string());
    assert_eq!(node.fcm.token_requests(), 1);

    // Gone tokens are pruned: one 410 / 404 each, then never tried again.
    wait_writer_metric(
        &node,
        "storage_writer_push_pruned_total",
        &["provider=\"apns\""],
        1,
    );
    wait_writer_metric(
        &node,
        "storage_writer_push_pruned_total",
        &["provider=\"fcm\""],
        1,
    );
    std::thread::sleep(Duration::from_millis(1_200));
    send(&mut alice, "again-dave", "dave");
    send(&mut alice, "again-erin", "erin");
    std::thread::sleep(Duration::from_millis(1_000));
    let to_dave = node
        .apns
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with(&apns_token(2)))
        .count();
    let to_erin = node
        .fcm
        .requests()
        .into_iter()
        .filter(|r| r.body["message"]["token"] == "erin:APA91b-token")
        .count();
    assert_eq!(
        (to_dave, to_erin),
        (1, 1),
        "pruned targets are not pushed again"
    );

    // 429 (FCM with Retry-After: 1, APNs without): retried, then sent.
    node.fcm.throttle(1);
    node.apns.throttle(1);
    std::thread::sleep(Duration::from_millis(1_000)); // past bob's and carol's windows
    send(&mut alice, "busy-carol", "carol");
    send(&mut alice, "busy-bob", "bob");
    node.fcm.wait_requests(2, |r| {
        r.body["message"]["token"] == "carol:APA91b-token" && r.status == 200
    });
    node.apns.wait_requests(2, to_device(&apns_token(1)));
    assert!(
        writer_metric(
            &node,
            "storage_writer_push_retries_total",
            &["provider=\"fcm\""]
        ) >= 1
    );
    assert!(
        writer_metric(
            &node,
            "storage_writer_push_retries_total",
            &["provider=\"apns\""]
        ) >= 1
    );

    // An expired credential: a new provider token / access token, then sent.
    node.apns.expire_next_credential();
    node.fcm.expire_next_credential();
    std::thread::sleep(Duration::from_millis(1_000));
    send(&mut alice, "stale-bob", "bob");
    send(&mut alice, "stale-carol", "carol");
    node.apns.wait_requests(3, to_device(&apns_token(1)));
    node.fcm.wait_requests(3, |r| {
        r.body["message"]["token"] == "carol:APA91b-token" && r.status == 200
    });
    assert_eq!(node.fcm.token_requests(), 2, "one new access token");
    assert_eq!(
        writer_metric(&node, "storage_writer_push_sent_total", &[]),
        6
    );
    assert_eq!(
        writer_metric(
            &node,
            "storage_writer_push_failed_total",
            &["reason=\"auth\""]
        ),
        0
    );
}
