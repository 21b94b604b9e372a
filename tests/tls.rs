//! The agent gateway over TLS with a private CA: an agent that trusts the CA enrolls, syncs and
//! streams; a client that speaks plaintext or trusts another CA gets nowhere.

mod support;

use std::path::Path;

use meridian_proto::agent_gateway_client::AgentGatewayClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::*;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Writes `ca.pem`, `cert.pem` and `key.pem` (for `localhost`) into `dir`; returns the CA PEM.
fn make_pki(dir: &Path) -> String {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("sign");
    let ca_pem = ca.as_ref().pem();
    std::fs::write(dir.join("ca.pem"), &ca_pem).expect("ca.pem");
    std::fs::write(dir.join("cert.pem"), cert.pem()).expect("cert.pem");
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("key.pem");
    ca_pem
}

async fn enroll_over(endpoint: Endpoint) -> Result<(), String> {
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    AgentGatewayClient::new(channel)
        .enroll(meridian_proto::EnrollRequest {
            token: "x".into(),
            hostname: "h".into(),
            version: "0".into(),
        })
        .await
        .map(|_| ())
        .map_err(|s| s.to_string())
}

#[tokio::test]
async fn agents_connect_over_tls_with_a_private_ca_and_nothing_else_does() {
    let root = temp_dir("meridian-tls");
    make_pki(&root);
    let env = [
        ("MERIDIAN_CONTROLLER_TLS_CERT", root.join("cert.pem").display().to_string()),
        ("MERIDIAN_CONTROLLER_TLS_KEY", root.join("key.pem").display().to_string()),
    ];
    let db = format!("sqlite://{}/controller.db", root.display());
    let controller = ControllerProc::start_with(&root.join("controller"), &db, &env).await;
    let admin = controller.client();
    admin.seed_site("SFO").await;
    let token = admin.enrollment_token("SFO").await;
    let port = controller.gateway.port();

    let agent_env = [("MERIDIAN_AGENT_CA_CERT", root.join("ca.pem").display().to_string())];
    let agent = AgentProc::spawn_with(
        &root.join("agent"),
        &format!("https://localhost:{port}"),
        &token,
        &agent_env,
    )
    .await;
    agent
        .wait_status("agent enrolled and configured over TLS", |s| {
            s["connected"] == true && s["config_revision"].as_u64() > Some(0)
        })
        .await;
    agent.issue_tickets("GEN", 10).await;
    agent.wait_status("events acknowledged over TLS", |s| s["outbox_pending"] == 0).await;

    // Plaintext against the TLS gateway fails.
    let plain = Endpoint::from_shared(format!("http://localhost:{port}")).expect("endpoint");
    assert!(enroll_over(plain).await.is_err(), "plaintext must not reach the TLS gateway");
    // A client trusting another CA refuses the controller's certificate.
    let other = temp_dir("meridian-tls-other");
    let other_ca = make_pki(&other);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(other_ca))
        .domain_name("localhost");
    let wrong = Endpoint::from_shared(format!("https://localhost:{port}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls");
    let err = enroll_over(wrong).await.expect_err("an untrusted certificate must be refused");
    assert!(!err.is_empty());
}
