//! Module variables a session looked up, and the addresses it knows them by.
//!
//! A variable's memory is the driver's, placed when its module loads. The
//! session knows it by the driver's address, except after a migration: the
//! target's driver places the module's variables elsewhere, while the
//! client (and what it stored: kernel parameters it built, addresses it
//! kept) goes on using the source's. So each variable has two addresses,
//! the one the client uses (`client`) and the device's (`real`), equal
//! until the session moves. Every call's addresses are translated from the
//! first to the second before the call is checked ([`Globals::relocate`]);
//! the range checks and the device then see device addresses only, so an
//! address a translation missed is refused, not misdirected.
//!
//! What is not translated: addresses the program stored in device memory
//! (a pointer to a variable written into a buffer), and addresses inside
//! tensor maps encoded before the move. Both are rare for variables (the
//! CUDA runtime looks every registered variable up, but programs pass
//! variables by symbol, which the runtime resolves through the lookup).

use crate::error::CallError;
use gpupool_proto::v1::{self, call::Op};
use std::collections::BTreeMap;

/// A looked-up variable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Variable {
    module: u32,
    name: String,
    size: u64,
    /// The address the client knows it by.
    client: u64,
    /// `__managed__`: the client keeps a host half at `client`.
    managed: bool,
}

/// A variable to look up again on a migration's target at the address the
/// client knows it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Moved {
    pub module: u32,
    pub name: String,
    pub client: u64,
    pub size: u64,
}

/// The session's module variables by device address, and the translation
/// of the addresses the client knows them by.
#[derive(Debug, Default)]
pub(crate) struct Globals {
    by_real: BTreeMap<u64, Variable>,
    /// Client address to (size, device address), for every variable.
    by_client: BTreeMap<u64, (u64, u64)>,
    /// How many variables have a client address other than the device's.
    moved: usize,
}

/// The new variable a lookup found: what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Known {
    pub client: u64,
    pub size: u64,
}

/// Where the client's addresses may not go: the session's own range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reserved {
    pub base: u64,
    pub size: u64,
}

impl Reserved {
    fn overlaps(&self, addr: u64, end: u64) -> bool {
        addr < self.base.saturating_add(self.size) && self.base < end
    }
}

/// Alignment of an address the server picks for a variable.
const PICKED_ALIGN: u64 = 1 << 12;

fn overlaps(map: &BTreeMap<u64, (u64, u64)>, addr: u64, end: u64) -> bool {
    map.range(..end).next_back().is_some_and(|(&start, &(size, _))| start.saturating_add(size) > addr)
}

impl Globals {
    pub(crate) fn len(&self) -> usize {
        self.by_real.len()
    }

    /// Whether a `__managed__` variable is among them (its host half lives
    /// in the client at the device's address).
    pub(crate) fn any_managed(&self) -> bool {
        self.by_real.values().any(|v| v.managed)
    }

    /// Whether `[addr, end)` lies inside one variable (device addresses).
    pub(crate) fn contains(&self, addr: u64, end: u64) -> bool {
        self.by_real.range(..=addr).next_back().is_some_and(|(&start, v)| end <= start + v.size)
    }

    /// Notes the variable `name` of `module` the device placed at `real`
    /// with `size` bytes (not empty), known to the client at `at` when
    /// given (a migrated session's), else at `real` unless that overlaps
    /// an address the client knows another variable by. A variable looked
    /// up again keeps its address.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn note(
        &mut self,
        module: u32,
        name: &str,
        real: u64,
        size: u64,
        managed: bool,
        at: Option<u64>,
        reserved: Reserved,
    ) -> Result<Known, CallError> {
        if let Some(v) = self.by_real.get(&real) {
            if at.is_some_and(|a| a != v.client) {
                return Err(CallError::invalid_value(format!(
                    "variable {name:?} is known at {:#x}, not {:#x}",
                    v.client,
                    at.unwrap_or_default()
                )));
            }
            return Ok(Known { client: v.client, size: v.size });
        }
        let client = match at {
            Some(a) => {
                let end = a.checked_add(size).ok_or_else(|| {
                    CallError::invalid_value(format!("variable {name:?} at {a:#x} of {size} bytes overflows"))
                })?;
                if managed && a != real {
                    return Err(CallError::not_supported(format!(
                        "managed variable {name:?} cannot be known at another address than the device's"
                    )));
                }
                if reserved.overlaps(a, end) || overlaps(&self.by_client, a, end) {
                    return Err(CallError::invalid_value(format!(
                        "variable {name:?} at {a:#x} (+{size}) overlaps the session's range or another variable"
                    )));
                }
                a
            }
            None if overlaps(&self.by_client, real, real + size) => {
                if managed {
                    return Err(CallError::not_supported(format!(
                        "managed variable {name:?} lies where the session knows another variable"
                    )));
                }
                self.free_address(size, reserved)?
            }
            None => real,
        };
        self.by_client.insert(client, (size, real));
        if client != real {
            self.moved += 1;
        }
        let v = Variable { module, name: name.to_owned(), size, client, managed };
        self.by_real.insert(real, v);
        Ok(Known { client, size })
    }

    /// An address for `size` bytes past every client and device address of
    /// the variables, and not in the session's range.
    fn free_address(&self, size: u64, reserved: Reserved) -> Result<u64, CallError> {
        let ends = self.by_client.iter().flat_map(|(&c, &(s, r))| [c + s, r + s]);
        let past = ends.max().unwrap_or(0);
        let mut at = past.checked_next_multiple_of(PICKED_ALIGN);
        if let Some(a) = at
            && reserved.overlaps(a, a.saturating_add(size))
        {
            at = (reserved.base + reserved.size).checked_next_multiple_of(PICKED_ALIGN);
        }
        at.filter(|a| a.checked_add(size).is_some())
            .ok_or_else(|| CallError::out_of_memory("no address left for a module variable"))
    }

    /// Forgets the variables of `module` (unloaded).
    pub(crate) fn unload(&mut self, module: u32) {
        let gone: Vec<u64> = self.by_real.iter().filter(|(_, v)| v.module == module).map(|(&r, _)| r).collect();
        for real in gone {
            if let Some(v) = self.by_real.remove(&real) {
                self.by_client.remove(&v.client);
                if v.client != real {
                    self.moved -= 1;
                }
            }
        }
    }

    /// The variables as a migration moves them.
    pub(crate) fn moved(&self) -> impl Iterator<Item = Moved> + '_ {
        self.by_real.values().map(|v| Moved { module: v.module, name: v.name.clone(), client: v.client, size: v.size })
    }

    /// The device address of client address `addr`: different only inside a
    /// variable the client knows at another address.
    pub(crate) fn translate(&self, addr: u64) -> u64 {
        if self.moved == 0 {
            return addr;
        }
        match self.by_client.range(..=addr).next_back() {
            Some((&client, &(size, real))) if addr - client < size => real + (addr - client),
            _ => addr,
        }
    }

    /// Translates the client addresses in `op` (see the module's
    /// documentation): every device address a call names, and each aligned
    /// 8-byte word of a kernel's parameters that falls inside a variable.
    pub(crate) fn relocate(&self, op: &mut Op) {
        if self.moved == 0 {
            return;
        }
        let t = |addr: &mut u64| *addr = self.translate(*addr);
        match op {
            Op::MemcpyHtod(c) => t(&mut c.dst),
            Op::MemcpyDtoh(c) => t(&mut c.src),
            Op::MemcpyDtod(c) => {
                t(&mut c.dst);
                t(&mut c.src);
            }
            Op::Memset(m) => t(&mut m.dst),
            Op::Launch(l) => self.relocate_params(l),
            Op::StreamMemOps(m) => m.ops.iter_mut().for_each(|o| t(&mut o.address)),
            Op::ArrayCopy(c) => {
                for place in [&mut c.dst, &mut c.src].into_iter().flatten() {
                    if let Some(v1::copy_place::Place::Device(d)) = &mut place.place {
                        t(&mut d.addr);
                    }
                }
            }
            Op::TensorMapEncode(m) => t(&mut m.global_address),
            Op::GraphInstantiate(g) => {
                if let Some(body) = &mut g.body {
                    self.relocate_body(body);
                }
            }
            _ => {}
        }
    }

    /// Copies the parameter buffer only when a word in it translates: a
    /// launch naming no moved variable (nearly all) costs a scan.
    fn relocate_params(&self, l: &mut v1::Launch) {
        let word = |w: &[u8]| u64::from_le_bytes(w.try_into().expect("8 bytes"));
        if !l.params.chunks_exact(8).any(|w| self.translate(word(w)) != word(w)) {
            return;
        }
        let mut params = l.params.to_vec();
        for w in params.chunks_exact_mut(8) {
            let real = self.translate(word(w));
            w.copy_from_slice(&real.to_le_bytes());
        }
        l.params = params.into();
    }

    fn relocate_body(&self, body: &mut v1::GraphBody) {
        use v1::graph_node::Kind;
        for node in &mut body.nodes {
            match &mut node.kind {
                Some(Kind::Kernel(l)) => self.relocate_params(l),
                Some(Kind::Memset(m)) => m.dst = self.translate(m.dst),
                Some(Kind::Memcpy(c)) => {
                    c.dst = self.translate(c.dst);
                    c.src = self.translate(c.src);
                }
                Some(Kind::Child(b)) => self.relocate_body(b),
                Some(Kind::Conditional(c)) => c.bodies.iter_mut().for_each(|b| self.relocate_body(b)),
                Some(Kind::Empty(_)) | None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: Reserved = Reserved { base: 0x10_0000_0000, size: 0x1_0000_0000 };

    fn known(client: u64, size: u64) -> Result<Known, CallError> {
        Ok(Known { client, size })
    }

    /// Without a move, variables are known at the device's addresses and
    /// nothing is translated.
    #[test]
    fn variables_are_known_at_the_devices_address_until_a_move() {
        let mut g = Globals::default();
        assert_eq!(g.note(1, "a", 0x7000, 64, false, None, RANGE), known(0x7000, 64));
        assert_eq!(g.note(1, "a", 0x7000, 64, false, None, RANGE), known(0x7000, 64), "again: the same");
        assert!(g.contains(0x7000, 0x7040) && !g.contains(0x7000, 0x7041));
        let mut op = Op::Memset(v1::Memset { dst: 0x7008, value: 1, element_size: 1, count: 8, stream: 0 });
        g.relocate(&mut op);
        assert!(matches!(&op, Op::Memset(m) if m.dst == 0x7008));
        g.unload(1);
        assert!(g.len() == 0 && !g.contains(0x7000, 0x7001));
    }

    /// A moved session's variables keep the source's addresses: copies,
    /// memsets, memory operations, array copies and kernel parameters
    /// (aligned words inside a variable only) reach the target's memory.
    #[test]
    fn a_moved_variable_is_translated_in_every_call() {
        let mut g = Globals::default();
        // The source placed it at 0x9000; the target's driver at 0x5000.
        assert_eq!(g.note(1, "a", 0x5000, 64, false, Some(0x9000), RANGE), known(0x9000, 64));
        assert_eq!(g.translate(0x9010), 0x5010);
        assert_eq!(g.translate(0x9040), 0x9040, "one past the end");
        assert_eq!(g.translate(0x8fff), 0x8fff);
        assert!(g.contains(0x5000, 0x5040), "checks see device addresses");

        let mut copy = Op::MemcpyDtod(v1::MemcpyDtoD { dst: 0x9008, src: 0x9000, size: 8, stream: 0 });
        g.relocate(&mut copy);
        assert!(matches!(&copy, Op::MemcpyDtod(c) if (c.dst, c.src) == (0x5008, 0x5000)));

        let mut params = Vec::new();
        params.extend_from_slice(&0x9020u64.to_le_bytes());
        params.extend_from_slice(&7u32.to_le_bytes());
        params.extend_from_slice(&0x9000u32.to_le_bytes()); // not an aligned 8-byte word
        params.extend_from_slice(&0x1234u64.to_le_bytes());
        let mut launch = Op::Launch(v1::Launch { params: params.into(), ..Default::default() });
        g.relocate(&mut launch);
        let Op::Launch(l) = &launch else { unreachable!() };
        assert_eq!(u64::from_le_bytes(l.params[..8].try_into().unwrap()), 0x5020);
        assert_eq!(l.params[8..16], [7, 0, 0, 0, 0, 0x90, 0, 0]);
        assert_eq!(u64::from_le_bytes(l.params[16..].try_into().unwrap()), 0x1234);

        let op = v1::StreamMemOp { kind: 5, address: 0x9000, value: 1, flags: 0 };
        let mut ops = Op::StreamMemOps(v1::StreamMemOps { stream: 0, ops: vec![op] });
        g.relocate(&mut ops);
        assert!(matches!(&ops, Op::StreamMemOps(m) if m.ops[0].address == 0x5000));

        let kernel = v1::GraphNode {
            deps: vec![],
            kind: Some(v1::graph_node::Kind::Kernel(v1::Launch {
                params: 0x9000u64.to_le_bytes().to_vec().into(),
                ..Default::default()
            })),
        };
        let child = v1::GraphNode {
            deps: vec![],
            kind: Some(v1::graph_node::Kind::Child(v1::GraphBody { nodes: vec![kernel] })),
        };
        let mut graph = Op::GraphInstantiate(v1::GraphInstantiate {
            body: Some(v1::GraphBody { nodes: vec![child] }),
            ..Default::default()
        });
        g.relocate(&mut graph);
        let Op::GraphInstantiate(v1::GraphInstantiate { body: Some(b), .. }) = &graph else { unreachable!() };
        let Some(v1::graph_node::Kind::Child(c)) = &b.nodes[0].kind else { unreachable!() };
        let Some(v1::graph_node::Kind::Kernel(k)) = &c.nodes[0].kind else { unreachable!() };
        assert_eq!(k.params[..], 0x5000u64.to_le_bytes());

        g.unload(1);
        assert_eq!(g.translate(0x9010), 0x9010, "gone with its module");
    }

    /// A variable the device places where the client knows another gets an
    /// address of the server's choice; the client's addresses never
    /// overlap each other or the session's range.
    #[test]
    fn client_addresses_never_overlap() {
        let mut g = Globals::default();
        g.note(1, "a", 0x5000, 64, false, Some(0x9000), RANGE).expect("moved");
        // The target's driver places a new variable where the client knows "a".
        let b = g.note(2, "b", 0x9000, 16, false, None, RANGE).expect("picked");
        assert!(b.client >= 0x9040 && b.client.is_multiple_of(PICKED_ALIGN), "{b:?}");
        assert_eq!(g.translate(b.client + 4), 0x9004);
        assert_eq!(g.translate(0x9004), 0x5004, "the client's 0x9004 is still a's");
        // Managed variables are never moved.
        assert!(g.note(3, "m", 0x9010, 8, true, None, RANGE).is_err());
        assert!(g.note(3, "m", 0xa000, 8, true, Some(0xb000), RANGE).is_err());
        // `at` may not overlap the range or another variable.
        assert!(g.note(4, "c", 0x6000, 8, false, Some(RANGE.base + 8), RANGE).is_err());
        assert!(g.note(4, "c", 0x6000, 8, false, Some(0x9038), RANGE).is_err());
        assert!(g.note(4, "c", 0x6000, 8, false, Some(u64::MAX - 4), RANGE).is_err());
        // A variable known already keeps its address.
        assert!(g.note(1, "a", 0x5000, 64, false, Some(0x9100), RANGE).is_err());
        assert_eq!(g.note(1, "a", 0x5000, 64, false, None, RANGE), known(0x9000, 64));
        // A picked address skips the session's range.
        let mut h = Globals::default();
        h.note(1, "a", RANGE.base - 64, 64, false, Some(RANGE.base - 4096), RANGE).expect("moved");
        let picked = h.note(2, "b", RANGE.base - 4088, 8, false, None, RANGE).expect("picked");
        assert!(picked.client >= RANGE.base + RANGE.size, "{picked:?}");
    }
}
