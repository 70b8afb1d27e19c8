//! The gRPC API: wire stability, prost round trips, and real tonic servers and
//! clients over loopback.

use std::error::Error;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::server::Router;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};
use turnpike_api::v1::admin_client::AdminClient;
use turnpike_api::v1::admin_server::{Admin, AdminServer};
use turnpike_api::v1::control_plane_client::ControlPlaneClient;
use turnpike_api::v1::control_plane_message::Message as Down;
use turnpike_api::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use turnpike_api::v1::data_plane_message::Message as Up;
use turnpike_api::v1::event::Body;
use turnpike_api::v1::table_change::Change;
use turnpike_api::v1::*;
use turnpike_api::{AddressError, ip_from_bytes, ip_to_bytes};

type TestResult = Result<(), Box<dyn Error + Send + Sync>>;

/// Every network test finishes well within this, or fails instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);

const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 50_000);
const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478);
const RELAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 49_152);
const PEER: SocketAddr = SocketAddr::new(
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x42)),
    40_000,
);
const DEADLINE: u64 = 1_800_000_000_000;

/// A STUN Allocate request header (RFC 8489 section 5): type 0x0003, length 0,
/// magic cookie, transaction id.
const ALLOCATE_REQUEST: [u8; 20] = [
    0x00, 0x03, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
];

fn five_tuple() -> FiveTuple {
    FiveTuple::new(Transport::Udp, CLIENT, SERVER)
}

fn allocation(id: u64, user: &str) -> Allocation {
    Allocation {
        allocation_id: id,
        worker_id: 1,
        five_tuple: Some(five_tuple()),
        relay_addresses: vec![RELAY.into()],
        deadline_unix_millis: DEADLINE,
        remaining_millis: 600_000,
        bandwidth_limit_bytes_per_second: 1_250_000,
        user_id: user.to_owned(),
        dont_fragment: false,
        username: String::new(),
    }
}

fn channel() -> Channel {
    Channel {
        channel_number: 0x4000,
        peer: Some(PEER.into()),
        deadline_unix_millis: DEADLINE - 1,
        remaining_millis: 599_999,
    }
}

fn permission() -> Permission {
    Permission {
        peer_ip: ip_to_bytes(PEER.ip()),
        deadline_unix_millis: DEADLINE - 2,
        remaining_millis: 599_998,
    }
}

fn usage(to_peer: u64, to_client: u64) -> Usage {
    Usage {
        client_to_peer: Some(TrafficCounters {
            packets: to_peer,
            bytes: to_peer * 1000,
        }),
        peer_to_client: Some(TrafficCounters {
            packets: to_client,
            bytes: to_client * 1000,
        }),
    }
}

fn round_trip<M: Message + Default>(message: &M) -> Result<M, prost::DecodeError> {
    M::decode(message.encode_to_vec().as_slice())
}

/// Field numbers and types are the contract between separately deployed
/// control and data planes: pin a few encodings byte for byte.
#[test]
fn wire_encoding_is_stable() {
    let addr = SocketAddress::from(SERVER);
    assert_eq!(
        addr.encode_to_vec(),
        [0x0a, 0x04, 192, 0, 2, 1, 0x10, 0x96, 0x1b]
    );

    let hello = DataPlaneMessage {
        message: Some(Up::Hello(Hello {
            data_plane_id: "dp".to_owned(),
            ..Hello::default()
        })),
    };
    assert_eq!(hello.encode_to_vec(), [0x0a, 0x04, 0x0a, 0x02, b'd', b'p']);

    let batch = ControlPlaneMessage {
        message: Some(Down::TableChanges(TableChangeBatch {
            table_version: 7,
            changes: vec![TableChange {
                change: Some(Change::AllocationRemove(AllocationRemove {
                    allocation_id: 9,
                })),
                worker_id: 0,
            }],
            ..Default::default()
        })),
    };
    assert_eq!(
        batch.encode_to_vec(),
        [0x1a, 0x08, 0x08, 0x07, 0x12, 0x04, 0x1a, 0x02, 0x08, 0x09]
    );
}

#[test]
fn table_change_batch_round_trips() -> TestResult {
    let changes = vec![
        Change::AllocationAdd(AllocationAdd {
            allocation: Some(allocation(42, "alice")),
        }),
        Change::AllocationRefresh(AllocationRefresh {
            allocation_id: 42,
            remaining_millis: 1_200_000,
        }),
        Change::PermissionAdd(PermissionAdd {
            allocation_id: 42,
            permission: Some(permission()),
        }),
        Change::ChannelAdd(ChannelAdd {
            allocation_id: 42,
            channel: Some(channel()),
            confirmed: true,
        }),
        Change::ChannelRemove(ChannelRemove {
            allocation_id: 42,
            channel_number: 0x4000,
        }),
        Change::PermissionRemove(PermissionRemove {
            allocation_id: 42,
            peer_ip: ip_to_bytes(PEER.ip()),
        }),
        Change::AllocationRemove(AllocationRemove { allocation_id: 42 }),
    ];
    let batch = TableChangeBatch {
        table_version: u64::MAX - 1,
        changes: changes
            .iter()
            .cloned()
            .map(|change| TableChange {
                change: Some(change),
                worker_id: 1,
            })
            .collect(),
        ..Default::default()
    };
    let down = ControlPlaneMessage {
        message: Some(Down::TableChanges(batch.clone())),
    };

    let decoded = round_trip(&down)?;
    assert_eq!(decoded, down);
    let Some(Down::TableChanges(decoded)) = decoded.message else {
        panic!("not a table change batch: {decoded:?}");
    };
    assert_eq!(decoded.table_version, u64::MAX - 1);
    let decoded: Vec<Change> = decoded
        .changes
        .into_iter()
        .filter_map(|change| change.change)
        .collect();
    assert_eq!(decoded, changes);
    Ok(())
}

#[test]
fn hello_with_resync_round_trips() -> TestResult {
    let v6_server = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 3478);
    let hello = Hello {
        data_plane_id: "dp-eu-1".to_owned(),
        listening_addresses: vec![
            ListeningAddress {
                transport: Transport::Udp.into(),
                address: Some(SERVER.into()),
            },
            ListeningAddress {
                transport: Transport::Tls.into(),
                address: Some(v6_server.into()),
            },
        ],
        relay_ips: vec![RelayIp {
            ip: ip_to_bytes(RELAY.ip()),
            advertised_ip: ip_to_bytes(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 7))),
        }],
        worker_count: 2,
        version: "0.1.0".to_owned(),
        table: Some(TableSnapshot {
            table_version: 1234,
            allocations: vec![
                AllocationState {
                    allocation: Some(allocation(1, "alice")),
                    permissions: vec![permission()],
                    channels: vec![channel()],
                },
                AllocationState {
                    allocation: Some(Allocation {
                        five_tuple: Some(FiveTuple::new(Transport::Tcp, PEER, v6_server)),
                        relay_addresses: vec![
                            RELAY.into(),
                            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 49_153).into(),
                        ],
                        ..allocation(2, "bob")
                    }),
                    permissions: Vec::new(),
                    channels: Vec::new(),
                },
            ],
            complete: true,
        }),
        started_unix_millis: 0,
    };
    let up = DataPlaneMessage {
        message: Some(Up::Hello(hello.clone())),
    };

    let decoded = round_trip(&up)?;
    assert_eq!(decoded, up);
    let Some(Up::Hello(decoded)) = decoded.message else {
        panic!("not a hello: {decoded:?}");
    };
    let table = decoded.table.expect("the snapshot survives");
    assert_eq!(table.table_version, 1234);
    assert!(table.complete);
    assert_eq!(table.allocations.len(), 2);
    let first = &table.allocations[0];
    assert_eq!(first.channels, [channel()]);
    assert_eq!(first.permissions, [permission()]);
    let second = table.allocations[1]
        .allocation
        .as_ref()
        .expect("allocation");
    let relays: Vec<SocketAddr> = second
        .relay_addresses
        .iter()
        .map(SocketAddr::try_from)
        .collect::<Result<_, _>>()?;
    assert_eq!(
        relays,
        [
            RELAY,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 49_153)
        ]
    );
    assert_eq!(
        second.five_tuple.as_ref().map(|t| t.transport()),
        Some(Transport::Tcp)
    );
    Ok(())
}

#[test]
fn addresses_convert_and_reject_bad_lengths() {
    for addr in [
        CLIENT,
        PEER,
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ] {
        let wire = SocketAddress::from(addr);
        assert_eq!(SocketAddr::try_from(&wire), Ok(addr));
        assert_eq!(
            SocketAddr::try_from(round_trip(&wire).expect("decodes")),
            Ok(addr)
        );
    }
    assert_eq!(SocketAddress::from(PEER).ip.len(), 16);
    let tuple = five_tuple();
    assert_eq!(tuple.transport(), Transport::Udp);
    assert_eq!(tuple.client, Some(SocketAddress::from(CLIENT)));
    assert_eq!(tuple.server, Some(SocketAddress::from(SERVER)));
    assert_eq!(
        ip_from_bytes(&[10, 0, 0, 1]),
        Ok(IpAddr::from([10, 0, 0, 1]))
    );
    assert_eq!(ip_from_bytes(&[]), Err(AddressError::IpLength(0)));
    assert_eq!(ip_from_bytes(&[0; 5]), Err(AddressError::IpLength(5)));
    assert_eq!(ip_from_bytes(&[0; 17]), Err(AddressError::IpLength(17)));
    let bad_port = SocketAddress {
        ip: vec![127, 0, 0, 1],
        port: 65_536,
    };
    assert_eq!(
        SocketAddr::try_from(&bad_port),
        Err(AddressError::PortOutOfRange(65_536))
    );
}

/// Serves `router` on 127.0.0.1, port 0. The listener is bound before this
/// returns, so clients can connect at once. Send on the returned sender to shut
/// the server down; the task ends with the server's result.
async fn serve(
    router: Router,
) -> Result<
    (
        SocketAddr,
        oneshot::Sender<()>,
        JoinHandle<Result<(), tonic::transport::Error>>,
    ),
    std::io::Error,
> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async {
            // An error means the sender was dropped: stop then too.
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop, server))
}

async fn connect(addr: SocketAddr) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
}

async fn with_timeout(test: impl Future<Output = TestResult>) -> TestResult {
    tokio::time::timeout(TEST_TIMEOUT, test).await?
}

/// A control plane that answers each punted request with a datagram
/// "answer to " + request, followed by a table change, and ends the stream
/// when that change is acknowledged. It reports every message it receives.
#[derive(Debug)]
struct FakeControlPlane {
    received: mpsc::UnboundedSender<DataPlaneMessage>,
}

#[tonic::async_trait]
impl ControlPlane for FakeControlPlane {
    type AttachStream = ReceiverStream<Result<ControlPlaneMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<DataPlaneMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let up = request.into_inner();
        let (down, down_rx) = mpsc::channel(4);
        let received = self.received.clone();
        tokio::spawn(async move {
            if let Err(status) = run_attach(up, &down, received).await {
                // The data plane may be gone already; nothing left to tell.
                let _ = down.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(down_rx)))
    }
}

async fn run_attach(
    mut up: Streaming<DataPlaneMessage>,
    down: &mpsc::Sender<Result<ControlPlaneMessage, Status>>,
    received: mpsc::UnboundedSender<DataPlaneMessage>,
) -> Result<(), Status> {
    let closed = |_| Status::internal("test receiver gone");
    let hello = up
        .message()
        .await?
        .ok_or_else(|| Status::failed_precondition("stream ended before Hello"))?;
    if !matches!(hello.message, Some(Up::Hello(_))) {
        return Err(Status::failed_precondition(
            "the first message must be Hello",
        ));
    }
    received.send(hello).map_err(closed)?;

    while let Some(message) = up.message().await? {
        received.send(message.clone()).map_err(closed)?;
        match message.message {
            Some(Up::PuntedRequest(request)) => {
                let mut answer = b"answer to ".to_vec();
                answer.extend_from_slice(&request.datagram);
                let replies = [
                    Down::SendDatagram(SendDatagram {
                        worker_id: request.worker_id,
                        five_tuple: request.five_tuple,
                        datagram: answer.into(),
                    }),
                    Down::TableChanges(TableChangeBatch {
                        table_version: 1,
                        changes: vec![TableChange {
                            change: Some(Change::AllocationAdd(AllocationAdd {
                                allocation: Some(allocation(7, "alice")),
                            })),
                            worker_id: 1,
                        }],
                        ..Default::default()
                    }),
                ];
                for reply in replies {
                    let message = ControlPlaneMessage {
                        message: Some(reply),
                    };
                    if down.send(Ok(message)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Some(Up::TableAck(_)) => return Ok(()),
            other => return Err(Status::invalid_argument(format!("unexpected {other:?}"))),
        }
    }
    Ok(())
}

#[tokio::test]
async fn attach_carries_punted_request_and_send_datagram() -> TestResult {
    with_timeout(async {
        let (received_tx, mut received) = mpsc::unbounded_channel();
        let service = ControlPlaneServer::new(FakeControlPlane {
            received: received_tx,
        });
        let (addr, stop, server) = serve(Server::builder().add_service(service)).await?;
        let mut client = ControlPlaneClient::new(connect(addr).await?);

        let hello = DataPlaneMessage {
            message: Some(Up::Hello(Hello {
                data_plane_id: "dp-1".to_owned(),
                worker_count: 4,
                ..Hello::default()
            })),
        };
        let punted = DataPlaneMessage {
            message: Some(Up::PuntedRequest(PuntedRequest {
                worker_id: 3,
                five_tuple: Some(five_tuple()),
                datagram: ALLOCATE_REQUEST.to_vec().into(),
            })),
        };
        let (up, up_rx) = mpsc::channel(4);
        up.send(hello.clone()).await?;
        up.send(punted.clone()).await?;
        let mut down = client
            .attach(ReceiverStream::new(up_rx))
            .await?
            .into_inner();

        // The answer goes back to the worker and 5-tuple the request came from.
        let first = down.message().await?.expect("a SendDatagram");
        let Some(Down::SendDatagram(send)) = first.message else {
            panic!("expected SendDatagram, got {first:?}");
        };
        assert_eq!(send.worker_id, 3);
        assert_eq!(send.five_tuple, Some(five_tuple()));
        assert_eq!(
            send.datagram.as_ref(),
            [b"answer to ".as_slice(), &ALLOCATE_REQUEST].concat()
        );

        let second = down.message().await?.expect("a TableChangeBatch");
        let Some(Down::TableChanges(batch)) = second.message else {
            panic!("expected TableChanges, got {second:?}");
        };
        assert_eq!(batch.table_version, 1);
        let ack = DataPlaneMessage {
            message: Some(Up::TableAck(TableAck {
                table_version: batch.table_version,
            })),
        };
        up.send(ack.clone()).await?;

        // The control plane ends the stream cleanly after the ack.
        assert_eq!(down.message().await?, None);
        for expected in [hello, punted, ack] {
            assert_eq!(received.recv().await, Some(expected));
        }

        let _ = stop.send(());
        server.await??;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn attach_rejects_a_stream_without_hello() -> TestResult {
    with_timeout(async {
        let (received_tx, _received) = mpsc::unbounded_channel();
        let service = ControlPlaneServer::new(FakeControlPlane {
            received: received_tx,
        });
        let (addr, stop, server) = serve(Server::builder().add_service(service)).await?;
        let mut client = ControlPlaneClient::new(connect(addr).await?);

        let ack = DataPlaneMessage {
            message: Some(Up::TableAck(TableAck { table_version: 1 })),
        };
        let mut down = client.attach(tokio_stream::iter([ack])).await?.into_inner();
        let status = down.message().await.expect_err("FAILED_PRECONDITION");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);

        let _ = stop.send(());
        server.await??;
        Ok(())
    })
    .await
}

/// An admin service whose only working call is WatchEvents, which streams the
/// events it was built with that match the request, then ends.
#[derive(Debug)]
struct FakeAdmin {
    events: Vec<Event>,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not part of this test"))
}

#[tonic::async_trait]
impl Admin for FakeAdmin {
    type WatchEventsStream = tokio_stream::Iter<std::vec::IntoIter<Result<Event, Status>>>;

    async fn list_allocations(
        &self,
        _: Request<ListAllocationsRequest>,
    ) -> Result<Response<ListAllocationsResponse>, Status> {
        unimplemented()
    }

    async fn get_allocation(
        &self,
        _: Request<GetAllocationRequest>,
    ) -> Result<Response<GetAllocationResponse>, Status> {
        unimplemented()
    }

    async fn revoke_allocation(
        &self,
        _: Request<RevokeAllocationRequest>,
    ) -> Result<Response<RevokeAllocationResponse>, Status> {
        unimplemented()
    }

    async fn revoke_user_allocations(
        &self,
        _: Request<RevokeUserAllocationsRequest>,
    ) -> Result<Response<RevokeUserAllocationsResponse>, Status> {
        unimplemented()
    }

    async fn get_stats(
        &self,
        _: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        unimplemented()
    }

    async fn drain_data_plane(
        &self,
        _: Request<DrainDataPlaneRequest>,
    ) -> Result<Response<DrainDataPlaneResponse>, Status> {
        unimplemented()
    }

    async fn rotate_secrets(
        &self,
        _: Request<RotateSecretsRequest>,
    ) -> Result<Response<RotateSecretsResponse>, Status> {
        unimplemented()
    }

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let filter = request.into_inner();
        let kinds: Vec<EventKind> = filter.kinds().collect();
        let wanted = |event: &Event| {
            let kind = match event.body {
                Some(Body::Usage(_)) => EventKind::Usage,
                Some(_) => EventKind::Lifecycle,
                None => EventKind::Unspecified,
            };
            (kinds.is_empty() || kinds.contains(&kind))
                && (filter.user_id.is_empty() || filter.user_id == event.user_id)
        };
        let events: Vec<Result<Event, Status>> = self
            .events
            .iter()
            .filter(|event| wanted(event))
            .cloned()
            .map(Ok)
            .collect();
        Ok(Response::new(tokio_stream::iter(events)))
    }
}

fn event(sequence: u64, user: &str, body: Body) -> Event {
    Event {
        sequence,
        timestamp_unix_millis: DEADLINE - 600_000 + sequence,
        allocation_id: if user == "alice" { 1 } else { 2 },
        user_id: user.to_owned(),
        data_plane_id: "dp-1".to_owned(),
        body: Some(body),
    }
}

#[tokio::test]
async fn watch_events_streams_lifecycle_and_usage() -> TestResult {
    with_timeout(async {
        let events = vec![
            event(
                1,
                "alice",
                Body::Created(AllocationCreated {
                    five_tuple: Some(five_tuple()),
                    relay_addresses: vec![RELAY.into()],
                    deadline_unix_millis: DEADLINE,
                }),
            ),
            event(
                2,
                "bob",
                Body::Refreshed(AllocationRefreshed {
                    deadline_unix_millis: DEADLINE,
                }),
            ),
            event(
                3,
                "alice",
                Body::ChannelAdded(ChannelAdded {
                    channel: Some(channel()),
                }),
            ),
            event(
                4,
                "alice",
                Body::Usage(UsageUpdate {
                    total: Some(usage(10, 20)),
                    delta: Some(usage(10, 20)),
                }),
            ),
            event(
                5,
                "alice",
                Body::Deleted(AllocationDeleted {
                    reason: DeletionReason::Revoked.into(),
                    detail: "abuse".to_owned(),
                    usage: Some(usage(11, 25)),
                }),
            ),
        ];
        let service = AdminServer::new(FakeAdmin {
            events: events.clone(),
        });
        let (addr, stop, server) = serve(Server::builder().add_service(service)).await?;
        let mut client = AdminClient::new(connect(addr).await?);

        let mut stream = client
            .watch_events(WatchEventsRequest {
                kinds: vec![EventKind::Lifecycle.into(), EventKind::Usage.into()],
                user_id: "alice".to_owned(),
                data_plane_id: String::new(),
            })
            .await?
            .into_inner();
        let mut got = Vec::new();
        while let Some(event) = stream.message().await? {
            got.push(event);
        }
        let alice: Vec<Event> = events
            .iter()
            .filter(|event| event.user_id == "alice")
            .cloned()
            .collect();
        assert_eq!(got, alice);
        let Some(Body::Deleted(deleted)) = &got[3].body else {
            panic!("expected a deletion, got {:?}", got[3]);
        };
        assert_eq!(deleted.reason(), DeletionReason::Revoked);

        // The other calls exist on the wire too.
        let status = client
            .get_stats(GetStatsRequest {})
            .await
            .expect_err("unimplemented in the fake");
        assert_eq!(status.code(), tonic::Code::Unimplemented);

        let _ = stop.send(());
        server.await??;
        Ok(())
    })
    .await
}
