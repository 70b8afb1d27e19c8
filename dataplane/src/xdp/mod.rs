//! The XDP fast path: the program of `bpf/relay.c`, loaded and attached with aya, and
//! the maps the workers keep in step with their relay tables.
//!
//! The program is an accelerator, never the authority: it relays only the flows whose
//! entries a worker wrote (`Mirror::sync`), each with its deadline, and passes
//! everything else to the sockets, where the workers decide exactly as without it.
//! Entries are written only for UDP allocations without a bandwidth limit (limits stay
//! on the socket path, where the token buckets are) whose client, listening and relayed
//! addresses are of one family, IPv4 or IPv6, for permissions and channels of that
//! family that are live, to peers that are not the server's own sockets. A permission
//! for an IP of the server itself is written too (another client's relayed address on
//! this server, the hairpin): the program refuses a peer on a port of the server's own
//! sockets (`set_denied`), as the workers refuse those sockets exactly.
//!
//! The hairpin: a client's datagram to a relayed address of this server whose
//! allocation has a permission for the sender's relayed IP is delivered by the program
//! to that allocation's client, whichever worker owns it (the maps are shared), and
//! counted in both allocations' usage slots.
//!
//! The program is attached through a BPF link: the kernel detaches it when the process
//! ends, however it ends, so a crashed server leaves nothing attached.
//!
//! The maps' keys and values, the constants and the counter indexes are not written
//! here: `abi` is generated from `bpf/relay.h` by the build script, with its layout
//! checked against rustc and clang (see `abi_gen.rs`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use ahash::AHashMap;
use aya::Pod;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{Xdp, XdpFlags};

use crate::core::table::{Alloc, Denied};
use crate::{AllocationId, Transport, Usage};
use abi::{
    TP_BYTES_DOWN, TP_BYTES_UP, TP_CSUM_COMPLETED, TP_DENY_WORDS, TP_FLAG_DONT_FRAGMENT,
    TP_MAX_SLOTS, TP_PASS_NOT_UDP, TP_PASS_PARTIAL_CSUM, TP_RELAYED_CHANNEL_DOWN,
    TP_RELAYED_CHANNEL_UP, TP_RELAYED_DATA_DOWN, TP_RELAYED_HAIRPIN_CHANNEL,
    TP_RELAYED_HAIRPIN_DATA, TP_RELAYED_SEND_UP, TP_STAT_MAX, TpAlloc, TpAlloc6, TpChan, TpChan6,
    TpChanKey, TpChanKey6, TpClient, TpClient6, TpPeer, TpPeerKey, TpPeerKey6, TpPerm, TpPerm6,
    TpPermKey, TpPermKey6, TpUsage,
};

mod abi;
#[cfg(test)]
mod abi_gen;

/// The program, built by the build script from `bpf/relay.c` when clang was there.
#[cfg(turnpike_xdp)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/relay.o"
)));
#[cfg(not(turnpike_xdp))]
static OBJECT: Option<&[u8]> = None;
/// The test and benchmark programs of `bpf/tools.c`.
#[cfg(turnpike_xdp)]
static TOOLS: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/tools.o"
)));
#[cfg(not(turnpike_xdp))]
static TOOLS: Option<&[u8]> = None;

/// The program's name in the object and in `bpftool prog`.
pub const PROGRAM: &str = "turnpike_relay";
/// A program that passes everything: attached to the far end of a test veth, it puts
/// that end in NAPI mode, so that frames sent into the veth with XDP_TX arrive.
pub const PASS_PROGRAM: &str = "turnpike_pass";
/// A program that sends every UDP datagram to port 7 back to its sender: the floor of
/// the benchmark.
pub const REFLECT_PROGRAM: &str = "turnpike_reflect";

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// In the driver (`xdpdrv`): the fast one; fails where the driver has no XDP.
    Native,
    /// In the generic stack (`xdpgeneric`): works everywhere, gains less.
    Generic,
    /// Native where the driver allows it, else generic.
    #[default]
    Auto,
}

impl std::str::FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<XdpMode, String> {
        match s {
            "native" => Ok(XdpMode::Native),
            "generic" => Ok(XdpMode::Generic),
            "auto" => Ok(XdpMode::Auto),
            _ => Err(format!("unknown XDP mode {s:?} (native, generic or auto)")),
        }
    }
}

/// The fast path's configuration: the interfaces to attach to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdpConfig {
    /// Interfaces, by name.
    pub interfaces: Vec<String>,
    /// The attach mode.
    pub mode: XdpMode,
    /// Links the process this one upgrades pinned for it, by interface, with their
    /// mode (`native` or `generic`): not attached at start; [`FastPath::take_over`]
    /// swaps this process's program into them atomically once its maps are filled.
    pub adopt: Vec<(String, &'static str, std::path::PathBuf)>,
}

/// Why the fast path is off, or what went wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// This build has no program (clang was missing when it was built).
    #[error("this build has no XDP program: {0}")]
    NotBuilt(&'static str),
    /// The kernel refused the program or a map.
    #[error("the kernel refused the XDP program: {0}")]
    Load(String),
    /// The program could not be attached to an interface.
    #[error("cannot attach XDP to {iface}: {why}")]
    Attach {
        /// The interface.
        iface: String,
        /// The kernel's answer.
        why: String,
    },
    /// A map could not be opened or written.
    #[error("XDP map {map}: {why}")]
    Map {
        /// The map.
        map: &'static str,
        /// What failed.
        why: String,
    },
}

/// Whether this build carries the program; `Err` says why not.
pub fn built() -> Result<(), XdpError> {
    match OBJECT {
        Some(_) => Ok(()),
        None => Err(XdpError::NotBuilt(off_reason())),
    }
}

fn off_reason() -> &'static str {
    match option_env!("TURNPIKE_XDP_OFF") {
        Some(r) if !r.is_empty() => r,
        _ => "built without clang",
    }
}

/// The number of the program's counters (`TP_STAT_MAX`).
pub const STAT_COUNT: usize = TP_STAT_MAX as usize;

/// The program's per-reason counters (`tp_stats`), in `relay.h`'s order: each
/// enumerator of `enum tp_stat`, lowercased, without `TP_PASS_` or `TP_`.
pub const STAT_NAMES: [&str; STAT_COUNT] = abi::TP_STAT_NAMES;

/// The range of [`STAT_NAMES`] that are reasons a frame was passed to the socket path.
const PASS_REASONS: std::ops::RangeInclusive<usize> =
    TP_PASS_NOT_UDP as usize..=TP_PASS_PARTIAL_CSUM as usize;

/// What the program did, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpStats {
    /// Counters by [`STAT_NAMES`] index.
    pub counters: [u64; STAT_COUNT],
}

impl XdpStats {
    /// Datagrams relayed client → peer (ChannelData and Send indications), hairpins
    /// included (one allocation's client to another's, each counted in both
    /// directions, as the socket path counts them).
    pub fn to_peer_packets(&self) -> u64 {
        self.counter(TP_RELAYED_CHANNEL_UP) + self.counter(TP_RELAYED_SEND_UP) + self.hairpins()
    }
    /// Datagrams relayed peer → client (ChannelData and Data indications), hairpins
    /// included.
    pub fn to_client_packets(&self) -> u64 {
        self.counter(TP_RELAYED_CHANNEL_DOWN) + self.counter(TP_RELAYED_DATA_DOWN) + self.hairpins()
    }
    /// Datagrams from a client delivered to another client of this relay (its peer
    /// being the other's relayed address) without leaving the program.
    pub fn hairpins(&self) -> u64 {
        self.counter(TP_RELAYED_HAIRPIN_CHANNEL) + self.counter(TP_RELAYED_HAIRPIN_DATA)
    }
    /// Application bytes relayed client → peer.
    pub fn to_peer_bytes(&self) -> u64 {
        self.counter(TP_BYTES_UP)
    }
    /// Application bytes relayed peer → client.
    pub fn to_client_bytes(&self) -> u64 {
        self.counter(TP_BYTES_DOWN)
    }
    /// Datagrams relayed, by path: `(name, count)`.
    pub fn relayed(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        (TP_RELAYED_CHANNEL_UP as usize..=TP_RELAYED_HAIRPIN_DATA as usize)
            .map(|i| (&STAT_NAMES[i]["relayed_".len()..], self.counters[i]))
    }
    /// Frames passed to the socket path, by reason: `(reason, count)`.
    pub fn passed(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        PASS_REASONS.map(|i| (STAT_NAMES[i], self.counters[i]))
    }
    /// Partial UDP checksums (from senders on this host, through a veth with transmit
    /// checksum offload) the program completed before relaying.
    pub fn completed_checksums(&self) -> u64 {
        self.counter(TP_CSUM_COMPLETED)
    }
    /// One counter, by its `tp_stat` index.
    fn counter(&self, index: u32) -> u64 {
        self.counters[index as usize]
    }
    /// Every frame passed to the socket path.
    pub fn passed_total(&self) -> u64 {
        self.passed().map(|(_, n)| n).sum()
    }
}

/// The map ids a worker opens its own handles from.
#[derive(Debug, Clone, Copy)]
struct MapIds {
    allocs: u32,
    chans: u32,
    perms: u32,
    peers: u32,
    allocs6: u32,
    chans6: u32,
    perms6: u32,
    peers6: u32,
    usage: u32,
}

/// Usage slots, shared by the workers.
#[derive(Debug, Default)]
struct Slots {
    free: Vec<u32>,
    next: u32,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        (self.next < TP_MAX_SLOTS).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// Whether the XDP fast path runs ([`crate::DataPlaneHandle::xdp_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XdpState {
    /// No interface was given (`--xdp IFACE`): relaying on the socket path only.
    NotAsked,
    /// Asked for but off (the program did not load or attach): why.
    Off(String),
    /// Attached to these interfaces.
    On(Vec<Attached>),
}

/// An interface the program is attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The interface.
    pub iface: String,
    /// `native` or `generic`.
    pub mode: &'static str,
}

/// The loaded program, its attachments and its maps.
pub struct FastPath {
    /// Holds the program and its links: dropped, the program is detached.
    ebpf: Mutex<aya::Ebpf>,
    attached: Vec<Attached>,
    /// The link of each interface attached here.
    links: Mutex<Vec<(String, aya::programs::xdp::XdpLinkId)>>,
    /// Links pinned for a process taking over (an upgrade), kept open here until it
    /// has them or the upgrade fails.
    pinned: Mutex<Vec<(String, aya::programs::links::PinnedLink)>>,
    /// Links pinned by the process this one upgrades, taken over by
    /// [`FastPath::take_over`].
    adopt: Mutex<Vec<(String, std::path::PathBuf)>>,
    ids: MapIds,
    slots: Mutex<Slots>,
    stats: PerCpuArray<MapData, u64>,
    deny: Mutex<Array<MapData, u32>>,
}

impl fmt::Debug for FastPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastPath")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> XdpError {
    move |e| XdpError::Map {
        map,
        why: e.to_string(),
    }
}

fn take(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<MapData, XdpError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(m) | Map::Array(m) | Map::PerCpuArray(m) | Map::Unsupported(m)) => Ok(m),
        _ => Err(XdpError::Map {
            map: name,
            why: "missing from the object".into(),
        }),
    }
}

/// The relay program of a loaded object.
fn program(ebpf: &mut aya::Ebpf) -> Result<&mut Xdp, XdpError> {
    ebpf.program_mut(PROGRAM)
        .ok_or_else(|| XdpError::Load(format!("no program {PROGRAM} in the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))
}

fn id_of(m: &MapData, name: &'static str) -> Result<u32, XdpError> {
    Ok(m.info().map_err(map_err(name))?.id())
}

impl FastPath {
    /// Loads the program and attaches it to every interface of `cfg` (none: loaded
    /// only, as the unit tests use it).
    pub fn start(cfg: &XdpConfig) -> Result<FastPath, XdpError> {
        FastPath::start_with_limits(cfg, &[])
    }

    /// [`FastPath::start`] with some maps smaller than relay.h says (the tests fill
    /// them).
    pub(crate) fn start_with_limits(
        cfg: &XdpConfig,
        limits: &[(&str, u32)],
    ) -> Result<FastPath, XdpError> {
        let object = OBJECT.ok_or(XdpError::NotBuilt(off_reason()))?;
        let mut loader = aya::EbpfLoader::new();
        for (map, n) in limits {
            loader.set_max_entries(map, *n);
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| XdpError::Load(e.to_string()))?;
        let mut attached = Vec::new();
        let mut links = Vec::new();
        for (iface, mode, _) in &cfg.adopt {
            attached.push(Attached {
                iface: iface.clone(),
                mode,
            });
        }
        {
            let prog = program(&mut ebpf)?;
            prog.load().map_err(|e| XdpError::Load(load_error(&e)))?;
            for iface in &cfg.interfaces {
                if cfg.adopt.iter().any(|(i, _, _)| i == iface) {
                    continue;
                }
                let mut try_mode = |prog: &mut Xdp, flags: XdpFlags| {
                    prog.attach(iface, flags)
                        .map(|id| links.push((iface.clone(), id)))
                        .map_err(|e| {
                            let why = attach_error(&e);
                            XdpError::Attach {
                                iface: iface.clone(),
                                why,
                            }
                        })
                };
                let mode = match cfg.mode {
                    XdpMode::Native => try_mode(prog, XdpFlags::DRV_MODE).map(|()| "native")?,
                    XdpMode::Generic => try_mode(prog, XdpFlags::SKB_MODE).map(|()| "generic")?,
                    XdpMode::Auto => match try_mode(prog, XdpFlags::DRV_MODE) {
                        Ok(()) => "native",
                        Err(e) => {
                            tracing::info!(error = %e, "native XDP refused: trying generic");
                            try_mode(prog, XdpFlags::SKB_MODE).map(|()| "generic")?
                        }
                    },
                };
                tracing::info!(iface = %iface, mode, "XDP fast path attached");
                if !forwarding_on6(iface) {
                    tracing::info!(
                        iface = %iface,
                        "net.ipv6.conf.{iface}.forwarding is 0: IPv6 flows stay on the socket path (forwarding_off)"
                    );
                }
                if !forwarding_on(iface) {
                    tracing::warn!(
                        iface = %iface,
                        "net.ipv4.conf.{iface}.forwarding is 0: the kernel's route lookup for XDP (bpf_fib_lookup) refuses, \
                         so every packet stays on the socket path (counted as forwarding_off); enable it with \
                         `sysctl -w net.ipv4.conf.{iface}.forwarding=1` (and a firewall forward policy of drop if \
                         this host must not route)"
                    );
                }
                attached.push(Attached {
                    iface: iface.clone(),
                    mode,
                });
            }
        }
        // Generic attachments: partial checksums are left to the workers there (see
        // tp_generic_ifs in relay.c).
        {
            let map = ebpf
                .map_mut("tp_generic_ifs")
                .ok_or_else(|| XdpError::Load("no map tp_generic_ifs in the object".into()))?;
            let mut generic: aya::maps::HashMap<_, u32, u32> =
                aya::maps::HashMap::try_from(map).map_err(map_err("tp_generic_ifs"))?;
            for a in attached.iter().filter(|a| a.mode == "generic") {
                let index = nix::net::if_::if_nametoindex(a.iface.as_str())
                    .map_err(|e| XdpError::Load(format!("{}: {e}", a.iface)))?;
                generic
                    .insert(index, 1, 0)
                    .map_err(|e| XdpError::Load(format!("tp_generic_ifs: {e}")))?;
            }
        }
        let allocs = take(&mut ebpf, "tp_allocs")?;
        let chans = take(&mut ebpf, "tp_chans")?;
        let perms = take(&mut ebpf, "tp_perms")?;
        let peers = take(&mut ebpf, "tp_peers")?;
        let usage = take(&mut ebpf, "tp_usage")?;
        let allocs6 = take(&mut ebpf, "tp_allocs6")?;
        let chans6 = take(&mut ebpf, "tp_chans6")?;
        let perms6 = take(&mut ebpf, "tp_perms6")?;
        let peers6 = take(&mut ebpf, "tp_peers6")?;
        let ids = MapIds {
            allocs: id_of(&allocs, "tp_allocs")?,
            chans: id_of(&chans, "tp_chans")?,
            perms: id_of(&perms, "tp_perms")?,
            peers: id_of(&peers, "tp_peers")?,
            allocs6: id_of(&allocs6, "tp_allocs6")?,
            chans6: id_of(&chans6, "tp_chans6")?,
            perms6: id_of(&perms6, "tp_perms6")?,
            peers6: id_of(&peers6, "tp_peers6")?,
            usage: id_of(&usage, "tp_usage")?,
        };
        let stats = PerCpuArray::try_from(Map::PerCpuArray(take(&mut ebpf, "tp_stats")?))
            .map_err(map_err("tp_stats"))?;
        let deny = Array::try_from(Map::Array(take(&mut ebpf, "tp_deny_ports")?))
            .map_err(map_err("tp_deny_ports"))?;
        Ok(FastPath {
            ebpf: Mutex::new(ebpf),
            attached,
            links: Mutex::new(links),
            pinned: Mutex::new(Vec::new()),
            adopt: Mutex::new(
                cfg.adopt
                    .iter()
                    .map(|(i, _, p)| (i.clone(), p.clone()))
                    .collect(),
            ),
            ids,
            slots: Mutex::new(Slots::default()),
            stats,
            deny: Mutex::new(deny),
        })
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// For an upgrade: pins this program's link on every interface under `dir` (a BPF
    /// file system) so that the new process can swap its own program into it; returns
    /// each interface with its mode and pin. The program stays attached and relaying
    /// until then. [`FastPath::unpin`] undoes it when the upgrade fails.
    pub fn pin_links(
        &self,
        dir: &std::path::Path,
    ) -> Result<Vec<(String, &'static str, std::path::PathBuf)>, XdpError> {
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prog = program(&mut ebpf)?;
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pinned = self
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = Vec::new();
        for (iface, id) in links.drain(..) {
            let mode = self
                .attached
                .iter()
                .find(|a| a.iface == iface)
                .map_or("native", |a| a.mode);
            let path = dir.join(format!("turnpike-upgrade-{}-{iface}", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let link = prog
                .take_link(id)
                .map_err(|e| XdpError::Load(format!("{iface}: {e}")))?;
            let fd: aya::programs::links::FdLink =
                link.try_into()
                    .map_err(|e: aya::programs::links::LinkError| {
                        XdpError::Load(format!("{iface}: {e}"))
                    })?;
            let p = fd.pin(&path).map_err(|e| {
                XdpError::Load(format!(
                    "pinning the link of {iface} at {}: {e}",
                    path.display()
                ))
            })?;
            pinned.push((iface.clone(), p));
            out.push((iface, mode, path));
        }
        Ok(out)
    }

    /// The upgrade failed: the pins go, the links stay with this program.
    pub fn unpin(&self) {
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Ok(prog) = program(&mut ebpf) else {
            return;
        };
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut pinned = self
            .pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (iface, p) in pinned.drain(..) {
            let kept = p
                .unpin()
                .map_err(|e| e.to_string())
                .and_then(|fd| aya::programs::xdp::XdpLink::try_from(fd).map_err(|e| e.to_string()))
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
            match kept {
                Ok(id) => links.push((iface, id)),
                Err(e) => {
                    tracing::warn!(iface = %iface, error = %e, "XDP link not taken back after a failed upgrade")
                }
            }
        }
    }

    /// For the process that takes over (an upgrade): swaps this program into the links
    /// the old process pinned, atomically on each interface (`bpf_link_update`): from
    /// here on packets meet this program and its maps, which the caller has filled.
    pub fn take_over(&self) -> Result<usize, XdpError> {
        let mut ebpf = self
            .ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prog = program(&mut ebpf)?;
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut adopt = self
            .adopt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0;
        for (iface, path) in adopt.drain(..) {
            let fail = |why: String| XdpError::Attach {
                iface: iface.clone(),
                why,
            };
            let pinned = aya::programs::links::PinnedLink::from_pin(&path)
                .map_err(|e| fail(format!("the link pinned at {}: {e}", path.display())))?;
            let fd = pinned
                .unpin()
                .map_err(|e| fail(format!("unpinning {}: {e}", path.display())))?;
            let link =
                aya::programs::xdp::XdpLink::try_from(fd).map_err(|e| fail(e.to_string()))?;
            let id = prog
                .attach_to_link(link)
                .map_err(|e| fail(format!("replacing the program: {e}")))?;
            tracing::info!(iface = %iface, "XDP program replaced on its link (upgrade)");
            links.push((iface, id));
            n += 1;
        }
        Ok(n)
    }

    /// The program's counters, summed over CPUs.
    pub fn stats(&self) -> XdpStats {
        let mut s = XdpStats::default();
        for (i, c) in s.counters.iter_mut().enumerate() {
            if let Ok(v) = self.stats.get(&(i as u32), 0) {
                *c = v.iter().sum();
            }
        }
        s
    }

    /// Writes the ports of the server's own sockets (`denied`): datagrams to or from a
    /// peer on one of them are left to the workers, which check the exact addresses.
    pub(crate) fn set_denied(&self, denied: &Denied) -> Result<(), XdpError> {
        let mut words = vec![0u32; TP_DENY_WORDS as usize];
        for port in denied.ports() {
            if let Some(w) = words.get_mut(usize::from(port >> 5)) {
                *w |= 1 << (port & 31);
            }
        }
        let mut deny = self.deny.lock().unwrap_or_else(|p| p.into_inner());
        for (i, w) in words.into_iter().enumerate() {
            deny.set(i as u32, w, 0).map_err(map_err("tp_deny_ports"))?;
        }
        Ok(())
    }

    /// A worker's own handles on the maps.
    pub(crate) fn mirror(self: &Arc<FastPath>) -> Result<Mirror, XdpError> {
        let open = |id: u32, name: &'static str| MapData::from_id(id).map_err(map_err(name));
        Ok(Mirror {
            fp: Arc::clone(self),
            allocs: HashMap::try_from(Map::HashMap(open(self.ids.allocs, "tp_allocs")?))
                .map_err(map_err("tp_allocs"))?,
            chans: HashMap::try_from(Map::HashMap(open(self.ids.chans, "tp_chans")?))
                .map_err(map_err("tp_chans"))?,
            perms: HashMap::try_from(Map::HashMap(open(self.ids.perms, "tp_perms")?))
                .map_err(map_err("tp_perms"))?,
            peers: HashMap::try_from(Map::HashMap(open(self.ids.peers, "tp_peers")?))
                .map_err(map_err("tp_peers"))?,
            allocs6: HashMap::try_from(Map::HashMap(open(self.ids.allocs6, "tp_allocs6")?))
                .map_err(map_err("tp_allocs6"))?,
            chans6: HashMap::try_from(Map::HashMap(open(self.ids.chans6, "tp_chans6")?))
                .map_err(map_err("tp_chans6"))?,
            perms6: HashMap::try_from(Map::HashMap(open(self.ids.perms6, "tp_perms6")?))
                .map_err(map_err("tp_perms6"))?,
            peers6: HashMap::try_from(Map::HashMap(open(self.ids.peers6, "tp_peers6")?))
                .map_err(map_err("tp_peers6"))?,
            usage: PerCpuArray::try_from(Map::PerCpuArray(open(self.ids.usage, "tp_usage")?))
                .map_err(map_err("tp_usage"))?,
            installed: AHashMap::new(),
            warned: false,
        })
    }

    /// Runs the program once on `frame` as if it had arrived on interface `ifindex`
    /// (`BPF_PROG_TEST_RUN`); returns the XDP action and the frame it left.
    pub fn test_run(&self, frame: &[u8], ifindex: u32) -> std::io::Result<(u32, Vec<u8>)> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| std::io::Error::other("no program"))?;
        let fd = prog.fd().map_err(std::io::Error::other)?;
        crate::io::sys::bpf_test_run_xdp(fd.as_fd(), frame, ifindex)
    }

    /// Loads [`PASS_PROGRAM`] and attaches it to `iface` natively, for as long as the
    /// returned value lives (tests and benchmarks: see [`PASS_PROGRAM`]).
    pub fn attach_pass(iface: &str) -> Result<aya::Ebpf, XdpError> {
        FastPath::attach_tool(PASS_PROGRAM, iface)
    }

    /// Loads one of the programs of `bpf/tools.c` ([`PASS_PROGRAM`],
    /// [`REFLECT_PROGRAM`]) and attaches it to `iface` natively, for as long as the
    /// returned value lives.
    pub fn attach_tool(program: &str, iface: &str) -> Result<aya::Ebpf, XdpError> {
        let object = TOOLS.ok_or(XdpError::NotBuilt(off_reason()))?;
        let mut ebpf = aya::Ebpf::load(object).map_err(|e| XdpError::Load(e.to_string()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .ok_or_else(|| XdpError::Load(format!("no program {program}")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        prog.load().map_err(|e| XdpError::Load(load_error(&e)))?;
        prog.attach(iface, XdpFlags::DRV_MODE)
            .map_err(|e| XdpError::Attach {
                iface: iface.into(),
                why: attach_error(&e),
            })?;
        Ok(ebpf)
    }
}

use std::os::fd::AsFd;

/// Whether IPv4 forwarding is on for `iface`, which `bpf_fib_lookup` requires.
pub fn forwarding_on(iface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
        .is_ok_and(|v| v.trim() == "1")
}

/// Whether IPv6 forwarding is on for `iface`, which `bpf_fib_lookup` requires.
pub fn forwarding_on6(iface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{iface}/forwarding"))
        .is_ok_and(|v| v.trim() == "1")
}

/// The verifier's log is long: its last lines say why.
fn load_error(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(4).collect();
            format!(
                "{io_error}; verifier: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }
        other => other.to_string(),
    }
}

fn attach_error(e: &aya::programs::ProgramError) -> String {
    let s = match e {
        aya::programs::ProgramError::SyscallError(s) => s.io_error.to_string(),
        other => other.to_string(),
    };
    if s.contains("busy") || s.contains("exists") {
        format!(
            "{s} (another XDP program is attached; `ip link set dev IFACE xdp off` removes one attached by `ip`)"
        )
    } else {
        s
    }
}

/// What a worker wrote for one allocation, to delete it again.
#[derive(Debug, Default)]
struct Installed {
    slot: u32,
    client: Vec<TpClient>,
    chans: Vec<TpChanKey>,
    perms: Vec<TpPermKey>,
    peers: Vec<TpPeerKey>,
    client6: Vec<TpClient6>,
    chans6: Vec<TpChanKey6>,
    perms6: Vec<TpPermKey6>,
    peers6: Vec<TpPeerKey6>,
    /// The slot's counters when last merged into the allocation's usage.
    seen: TpUsage,
}

/// A worker's side of the maps: writes its allocations' entries, and merges what the
/// program relayed into their usage.
pub(crate) struct Mirror {
    fp: Arc<FastPath>,
    allocs: HashMap<MapData, TpClient, TpAlloc>,
    chans: HashMap<MapData, TpChanKey, TpChan>,
    perms: HashMap<MapData, TpPermKey, TpPerm>,
    peers: HashMap<MapData, TpPeerKey, TpPeer>,
    allocs6: HashMap<MapData, TpClient6, TpAlloc6>,
    chans6: HashMap<MapData, TpChanKey6, TpChan6>,
    perms6: HashMap<MapData, TpPermKey6, TpPerm6>,
    peers6: HashMap<MapData, TpPeerKey6, TpPeer>,
    usage: PerCpuArray<MapData, TpUsage>,
    installed: AHashMap<AllocationId, Installed>,
    warned: bool,
}

impl fmt::Debug for Mirror {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mirror")
            .field("installed", &self.installed.len())
            .finish_non_exhaustive()
    }
}

/// The kernel's monotonic clock, which `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to write.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) } != 0 {
        return 0;
    }
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// A unix-millisecond deadline as a monotonic one; 0 when it has passed.
fn deadline_ns(deadline_ms: u64, now_ms: u64, mono: u64) -> u64 {
    if deadline_ms <= now_ms {
        return 0;
    }
    mono.saturating_add((deadline_ms - now_ms).saturating_mul(1_000_000))
}

fn v4(a: &SocketAddr) -> Option<(u32, u16)> {
    match a {
        SocketAddr::V4(a) => Some((u32::from_ne_bytes(a.ip().octets()), a.port().to_be())),
        SocketAddr::V6(_) => None,
    }
}

fn ip4(ip: &IpAddr) -> Option<Ipv4Addr> {
    match ip.to_canonical() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

/// The entries one allocation should have (of one family: the other's lists are empty).
#[derive(Debug, Default)]
struct Entries {
    client: Vec<(TpClient, TpAlloc)>,
    chans: Vec<(TpChanKey, TpChan)>,
    perms: Vec<(TpPermKey, TpPerm)>,
    peers: Vec<(TpPeerKey, TpPeer)>,
    client6: Vec<(TpClient6, TpAlloc6)>,
    chans6: Vec<(TpChanKey6, TpChan6)>,
    perms6: Vec<(TpPermKey6, TpPerm6)>,
    peers6: Vec<(TpPeerKey6, TpPeer)>,
}

impl Entries {
    /// Whether the program serves the allocation at all.
    fn served(&self) -> bool {
        !self.client.is_empty() || !self.client6.is_empty()
    }
}

fn v6(a: &SocketAddr) -> Option<([u8; 16], u16)> {
    match a {
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_none() => {
            Some((a.ip().octets(), a.port().to_be()))
        }
        _ => None,
    }
}

/// The IPv6 entries of `a` (RFC 6156): its client, listening and relayed addresses all
/// IPv6, peers IPv6.
fn entries6(a: &Alloc, slot: u32, denied: &Denied, now_ms: u64, mono: u64, e: &mut Entries) {
    let (Some((client_ip, client_port)), Some((server_ip, server_port))) =
        (v6(&a.tuple.client), v6(&a.tuple.server))
    else {
        return;
    };
    let Some((relay_ip, relay_port)) = a
        .relays
        .iter()
        .filter(|r| !r.ip().is_unspecified())
        .find_map(v6)
    else {
        return;
    };
    let client = TpClient6 {
        client_ip,
        server_ip,
        client_port,
        server_port,
    };
    let alloc_deadline = deadline_ns(a.deadline, now_ms, mono);
    e.client6.push((
        client,
        TpAlloc6 {
            deadline_ns: alloc_deadline,
            relay_ip,
            relay_port,
            slot,
            ..TpAlloc6::default()
        },
    ));
    let mut perm_deadlines = AHashMap::new();
    for (ip, &d) in &a.perms {
        let IpAddr::V6(peer) = ip.to_canonical() else {
            continue;
        };
        if d <= now_ms || peer.is_unspecified() {
            continue;
        }
        let deadline = alloc_deadline.min(deadline_ns(d, now_ms, mono));
        perm_deadlines.insert(peer, deadline);
        e.perms6.push((
            TpPermKey6 {
                relay_ip,
                peer_ip: peer.octets(),
                relay_port,
                _pad: 0,
            },
            TpPerm6 {
                deadline_ns: deadline,
                client,
                slot,
            },
        ));
    }
    for (&num, ch) in &a.channels {
        let SocketAddr::V6(peer) = ch.peer else {
            continue;
        };
        let Some(&perm) = perm_deadlines.get(peer.ip()) else {
            continue;
        };
        if ch.deadline <= now_ms || denied.contains(&ch.peer) {
            continue;
        }
        let deadline = perm.min(deadline_ns(ch.deadline, now_ms, mono));
        let (peer_ip, peer_port) = (peer.ip().octets(), peer.port().to_be());
        e.chans6.push((
            TpChanKey6 {
                client,
                channel: num,
                _pad: 0,
            },
            TpChan6 {
                deadline_ns: deadline,
                relay_ip,
                peer_ip,
                relay_port,
                peer_port,
                slot,
                flags: 0,
                _pad: [0; 7],
            },
        ));
        if ch.confirmed && a.peer_channel.get(&ch.peer) == Some(&num) {
            e.peers6.push((
                TpPeerKey6 {
                    relay_ip,
                    peer_ip,
                    relay_port,
                    peer_port,
                },
                TpPeer {
                    deadline_ns: deadline,
                    channel: num,
                    _pad: [0; 3],
                },
            ));
        }
    }
}

/// Writes `want` into `map` and deletes what `have` held that `want` does not; `have`
/// becomes `want`'s keys. `false` when an insert failed (a full map).
fn replace<K: Pod + PartialEq, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    want: &[(K, V)],
    have: &mut Vec<K>,
) -> bool {
    let mut ok = true;
    for (k, v) in want {
        ok &= map.insert(k, v, 0).is_ok();
    }
    for k in have.iter() {
        if !want.iter().any(|(w, _)| w == k) {
            let _ = map.remove(k);
        }
    }
    *have = want.iter().map(|(k, _)| *k).collect();
    ok
}

fn clear<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>, have: &[K]) {
    for k in have {
        let _ = map.remove(k);
    }
}

/// What the program may relay for `a` at `now_ms` (unix) with the monotonic clock at
/// `mono`; empty for an allocation the program does not serve.
fn entries(a: &Alloc, slot: u32, denied: &Denied, now_ms: u64, mono: u64) -> Entries {
    let mut e = Entries::default();
    if a.tuple.transport != Transport::Udp || a.bandwidth != 0 || now_ms >= a.deadline {
        return e;
    }
    let (Some((client_ip, client_port)), Some((server_ip, server_port))) =
        (v4(&a.tuple.client), v4(&a.tuple.server))
    else {
        entries6(a, slot, denied, now_ms, mono, &mut e);
        return e;
    };
    let Some((relay_ip, relay_port)) = a
        .relays
        .iter()
        .filter(|r| r.is_ipv4() && !r.ip().is_unspecified())
        .find_map(v4)
    else {
        return e;
    };
    let client = TpClient {
        client_ip,
        server_ip,
        client_port,
        server_port,
    };
    let flags = if a.dont_fragment {
        TP_FLAG_DONT_FRAGMENT
    } else {
        0
    };
    let alloc_deadline = deadline_ns(a.deadline, now_ms, mono);
    e.client.push((
        client,
        TpAlloc {
            deadline_ns: alloc_deadline,
            relay_ip,
            relay_port,
            flags,
            slot,
            ..TpAlloc::default()
        },
    ));
    let mut perm_deadlines = AHashMap::new();
    for (ip, &d) in &a.perms {
        let Some(peer) = ip4(ip) else { continue };
        if d <= now_ms || peer.is_unspecified() {
            continue;
        }
        let deadline = alloc_deadline.min(deadline_ns(d, now_ms, mono));
        perm_deadlines.insert(peer, deadline);
        e.perms.push((
            TpPermKey {
                relay_ip,
                peer_ip: u32::from_ne_bytes(peer.octets()),
                relay_port,
                _pad: 0,
            },
            TpPerm {
                deadline_ns: deadline,
                client,
                slot,
            },
        ));
    }
    for (&num, ch) in &a.channels {
        let SocketAddr::V4(peer) = ch.peer else {
            continue;
        };
        let Some(&perm) = perm_deadlines.get(peer.ip()) else {
            continue;
        };
        if ch.deadline <= now_ms || denied.contains(&ch.peer) {
            continue;
        }
        let deadline = perm.min(deadline_ns(ch.deadline, now_ms, mono));
        let (peer_ip, peer_port) = (u32::from_ne_bytes(peer.ip().octets()), peer.port().to_be());
        e.chans.push((
            TpChanKey {
                client,
                channel: num,
                _pad: 0,
            },
            TpChan {
                deadline_ns: deadline,
                relay_ip,
                peer_ip,
                relay_port,
                peer_port,
                slot,
                flags,
                _pad: [0; 7],
            },
        ));
        if ch.confirmed && a.peer_channel.get(&ch.peer) == Some(&num) {
            e.peers.push((
                TpPeerKey {
                    relay_ip,
                    peer_ip,
                    relay_port,
                    peer_port,
                },
                TpPeer {
                    deadline_ns: deadline,
                    channel: num,
                    _pad: [0; 3],
                },
            ));
        }
    }
    e
}

impl Mirror {
    /// Brings allocation `id`'s entries in step with `alloc` (`None`: it is gone).
    pub(crate) fn sync(
        &mut self,
        id: AllocationId,
        alloc: Option<&mut Alloc>,
        denied: &Denied,
        now_ms: u64,
    ) {
        let Some(a) = alloc else {
            self.remove(id, None);
            return;
        };
        let installed = self.installed.get(&id).map(|i| i.slot);
        let want = entries(a, installed.unwrap_or(0), denied, now_ms, monotonic_ns());
        if !want.served() {
            // Not (or no longer) for the program: a TCP/TLS client, a bandwidth limit,
            // mixed families, or one past its deadline.
            self.remove(id, Some(a));
            return;
        }
        let slot = match installed {
            Some(s) => s,
            None => match self.new_slot() {
                Some(s) => s,
                None => return,
            },
        };
        let want = if installed.is_some() {
            want
        } else {
            entries(a, slot, denied, now_ms, monotonic_ns())
        };
        let inst = self.installed.entry(id).or_insert_with(|| Installed {
            slot,
            ..Installed::default()
        });
        // For each map, new entries first, then the stale ones go: a packet never meets
        // a gap.
        let mut ok = replace(&mut self.allocs, &want.client, &mut inst.client);
        ok &= replace(&mut self.perms, &want.perms, &mut inst.perms);
        ok &= replace(&mut self.chans, &want.chans, &mut inst.chans);
        ok &= replace(&mut self.peers, &want.peers, &mut inst.peers);
        ok &= replace(&mut self.allocs6, &want.client6, &mut inst.client6);
        ok &= replace(&mut self.perms6, &want.perms6, &mut inst.perms6);
        ok &= replace(&mut self.chans6, &want.chans6, &mut inst.chans6);
        ok &= replace(&mut self.peers6, &want.peers6, &mut inst.peers6);
        if !ok {
            // A full map: this allocation stays on the socket path.
            if !self.warned {
                tracing::warn!(
                    id = id.0,
                    "an XDP map is full: allocations beyond it stay on the socket path"
                );
                self.warned = true;
            }
            self.remove(id, Some(a));
        }
    }

    /// Brings the entries of every allocation in `touched` in step with `allocs`:
    /// the removed ones first, since a new allocation of the same 5-tuple reuses their
    /// keys (the client's, its channels').
    pub(crate) fn sync_all(
        &mut self,
        touched: &mut Vec<AllocationId>,
        allocs: &mut AHashMap<AllocationId, Alloc>,
        denied: &Denied,
        now_ms: u64,
    ) {
        touched.sort_unstable_by_key(|id| (allocs.contains_key(id), id.0));
        touched.dedup();
        for id in touched.drain(..) {
            self.sync(id, allocs.get_mut(&id), denied, now_ms);
        }
    }

    fn new_slot(&mut self) -> Option<u32> {
        let slot = self
            .fp
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        // A slot is zeroed before it is used again.
        let zeros =
            PerCpuValues::try_from(vec![TpUsage::default(); aya::util::nr_cpus().unwrap_or(1)])
                .ok()?;
        if self.usage.set(slot, zeros, 0).is_err() {
            self.fp
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .free
                .push(slot);
            return None;
        }
        Some(slot)
    }

    /// Deletes allocation `id`'s entries, merging what the program relayed for it into
    /// its usage first when it is still there.
    fn remove(&mut self, id: AllocationId, alloc: Option<&mut Alloc>) {
        let Some(inst) = self.installed.remove(&id) else {
            return;
        };
        clear(&mut self.allocs, &inst.client);
        clear(&mut self.perms, &inst.perms);
        clear(&mut self.chans, &inst.chans);
        clear(&mut self.peers, &inst.peers);
        clear(&mut self.allocs6, &inst.client6);
        clear(&mut self.perms6, &inst.perms6);
        clear(&mut self.chans6, &inst.chans6);
        clear(&mut self.peers6, &inst.peers6);
        if let Some(a) = alloc {
            let now = self.read(inst.slot);
            merge(&mut a.usage, &inst.seen, &now);
        }
        self.fp
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(inst.slot);
    }

    fn read(&self, slot: u32) -> TpUsage {
        let mut u = TpUsage::default();
        if let Ok(v) = self.usage.get(&slot, 0) {
            for c in v.iter() {
                u.to_peer_packets += c.to_peer_packets;
                u.to_peer_bytes += c.to_peer_bytes;
                u.to_client_packets += c.to_client_packets;
                u.to_client_bytes += c.to_client_bytes;
            }
        }
        u
    }

    /// Merges what the program relayed since the last call into the allocations' usage.
    pub(crate) fn collect(&mut self, allocs: &mut AHashMap<AllocationId, Alloc>) {
        let ids: Vec<AllocationId> = self.installed.keys().copied().collect();
        for id in ids {
            let Some(slot) = self.installed.get(&id).map(|i| i.slot) else {
                continue;
            };
            let now = self.read(slot);
            if let (Some(inst), Some(a)) = (self.installed.get_mut(&id), allocs.get_mut(&id)) {
                merge(&mut a.usage, &inst.seen, &now);
                inst.seen = now;
            }
        }
    }

    /// Allocations with entries in the maps.
    pub(crate) fn installed(&self) -> usize {
        self.installed.len()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let ids: Vec<AllocationId> = self.installed.keys().copied().collect();
        for id in ids {
            self.remove(id, None);
        }
    }
}

fn merge(u: &mut Usage, seen: &TpUsage, now: &TpUsage) {
    u.to_peer.packets += now.to_peer_packets.saturating_sub(seen.to_peer_packets);
    u.to_peer.bytes += now.to_peer_bytes.saturating_sub(seen.to_peer_bytes);
    u.to_client.packets += now.to_client_packets.saturating_sub(seen.to_client_packets);
    u.to_client.bytes += now.to_client_bytes.saturating_sub(seen.to_client_bytes);
}

#[cfg(test)]
mod tests;
