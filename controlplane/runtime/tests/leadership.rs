//! The leadership gate of the gRPC services (split mode with an election): a follower
//! refuses data planes and Admin calls naming the leader, and a leader that steps down
//! closes the streams of its data planes before anyone else may lead.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;
use tonic::transport::{Channel, Server as GrpcServer};
use turnpike_api::v1::{
    self, admin_client::AdminClient, admin_server::AdminServer,
    control_plane_client::ControlPlaneClient, control_plane_server::ControlPlaneServer,
    data_plane_message,
};
use turnpike_controlplane::{Credentials, Server, ServerConfig};
use turnpike_controlplane_runtime::ControlPlaneHandle;

/// A control plane on loopback (plain HTTP/2: the gate, not TLS, is under test).
async fn start() -> (ControlPlaneHandle, Channel) {
    let cfg = ServerConfig {
        relay_ips: vec!["192.0.2.10".parse().unwrap()],
        relay_ports: (50000, 50099),
        relay_pool: 0,
        ..ServerConfig::default()
    };
    let creds = Credentials::new("example.org", &[("u".into(), "p".into())], &[]);
    let cp = ControlPlaneHandle::spawn(Server::new(cfg, creds, [7; 32], 1));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = GrpcServer::builder()
        .add_service(ControlPlaneServer::new(cp.clone()))
        .add_service(AdminServer::new(cp.clone()));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (cp, channel)
}

fn hello(id: &str) -> v1::DataPlaneMessage {
    v1::DataPlaneMessage {
        message: Some(data_plane_message::Message::Hello(v1::Hello {
            data_plane_id: id.into(),
            worker_count: 1,
            ..Default::default()
        })),
    }
}

/// Attaches as data plane `id`; the stream down, or the refusal.
async fn attach(
    channel: &Channel,
    id: &str,
) -> Result<(tonic::Streaming<v1::ControlPlaneMessage>, impl Sized), tonic::Status> {
    let (up, rx) = tokio::sync::mpsc::channel(4);
    up.send(hello(id)).await.unwrap();
    let down = ControlPlaneClient::new(channel.clone())
        .attach(ReceiverStream::new(rx))
        .await?
        .into_inner();
    // The sender is kept with the stream: dropping it would end the data plane's side.
    Ok((down, up))
}

async fn attached(cp: &ControlPlaneHandle) -> usize {
    let stats = cp.stats().await.unwrap();
    stats.data_planes.iter().filter(|d| d.attached).count()
}

#[tokio::test]
async fn a_follower_refuses_data_planes_and_admin_and_names_the_leader() {
    let (cp, channel) = start().await;
    cp.set_leader(false);
    let refused = attach(&channel, "dp1").await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("no leader"), "{refused:?}");

    cp.set_known_leader(Some("https://10.0.0.1:3479".into()));
    let refused = attach(&channel, "dp1").await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(
        refused
            .message()
            .contains("the leader is https://10.0.0.1:3479"),
        "{refused:?}"
    );
    let admin = AdminClient::new(channel.clone())
        .get_stats(v1::GetStatsRequest {})
        .await
        .err()
        .unwrap();
    assert_eq!(admin.code(), Code::Unavailable);
    assert!(admin.message().contains("https://10.0.0.1:3479"));
    assert_eq!(attached(&cp).await, 0);

    // Elected: data planes and Admin are served.
    cp.set_leader(true);
    let (_down, _up) = attach(&channel, "dp1").await.unwrap();
    let stats = AdminClient::new(channel.clone())
        .get_stats(v1::GetStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.data_planes.len(), 1);
}

#[tokio::test]
async fn stepping_down_closes_the_streams_of_attached_data_planes() {
    let (cp, channel) = start().await;
    let (mut d1, _u1) = attach(&channel, "dp1").await.unwrap();
    let (mut d2, _u2) = attach(&channel, "dp2").await.unwrap();
    assert_eq!(attached(&cp).await, 2);

    cp.step_down().await;
    assert!(!cp.is_leader());
    for down in [&mut d1, &mut d2] {
        // Whatever was queued before the step-down may still arrive; then the stream ends.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = down.message().await {}
        })
        .await;
        assert!(ended.is_ok(), "the stream outlived the leadership");
    }
    assert_eq!(attached(&cp).await, 0);
    let refused = attach(&channel, "dp1").await.err().unwrap();
    assert_eq!(refused.code(), Code::Unavailable);
}
