//! A session's state as it moves to another server (live migration,
//! `docs/migration.md`).
//!
//! The source keeps a journal of the calls whose effects outlive them
//! (module loads, function attributes, streams, events, context limits),
//! compacted as things are destroyed, so it stays bounded by the handle
//! limits. To move, the session exports its mappings as `MemMap` calls,
//! the journal, and the contents of every mapping. The target opens a
//! session on the same address range, runs those calls through the same
//! checked path as a client's batch, and writes the contents back through
//! the same range checks as a copy: nothing from the wire is trusted more
//! than a client's calls are.
//!
//! Module variables the session looked up move with their contents: the
//! target looks each up again, keeps the address the client knows it by
//! and translates it in every call from then on (session/globals.rs).
//!
//! Not moved (the session refuses to migrate while it holds any): arrays
//! and texture or surface objects (the driver places their memory),
//! `__managed__` variables (the client keeps their host half at the
//! driver's address) and graphs with conditional nodes. Events keep their
//! handles but not their recorded times.

use super::SessionState;
use crate::device::{ACCESS_READ, ACCESS_READWRITE, BackendSession};
use crate::error::CallError;
use gpupool_proto::v1::{self, call::Op};

/// The calls that re-create a session's lasting state, in order.
#[derive(Debug, Default)]
pub(super) struct Journal {
    ops: Vec<Op>,
}

/// What a call leaves behind for the journal: the call itself (a module
/// load without its image), or `None` when it leaves nothing.
pub(super) fn lasting(op: &Op) -> Option<Op> {
    Some(match op {
        Op::ModuleLoad(m) => {
            Op::ModuleLoad(v1::ModuleLoad { module: m.module, sha256: m.sha256.clone(), image: None, staged: None })
        }
        Op::ModuleUnload(_)
        | Op::StreamCreate(_)
        | Op::StreamDestroy(_)
        | Op::StreamSetAttribute(_)
        | Op::EventCreate(_)
        | Op::EventDestroy(_)
        | Op::FuncSetAttribute(_)
        | Op::CtxSetLimit(_) => op.clone(),
        _ => return None,
    })
}

impl Journal {
    /// Records a call that succeeded: creations and settings are kept (a
    /// setting replaces the one it overrides), a destruction removes what it
    /// destroyed.
    pub(super) fn record(&mut self, op: Op) {
        match &op {
            Op::ModuleUnload(u) => self.ops.retain(|o| match o {
                Op::ModuleLoad(m) => m.module != u.module,
                Op::FuncSetAttribute(a) => a.module != u.module,
                _ => true,
            }),
            Op::StreamDestroy(d) => self.ops.retain(|o| match o {
                Op::StreamCreate(s) => s.stream != d.stream,
                Op::StreamSetAttribute(a) => a.stream != d.stream,
                _ => true,
            }),
            Op::EventDestroy(d) => self.ops.retain(|o| !matches!(o, Op::EventCreate(e) if e.event == d.event)),
            Op::FuncSetAttribute(a) => {
                self.ops.retain(|o| {
                    !matches!(o, Op::FuncSetAttribute(b)
                        if (b.module, b.function, b.attribute) == (a.module, a.function, a.attribute))
                });
                self.ops.push(op);
            }
            Op::StreamSetAttribute(a) => {
                self.ops.retain(
                    |o| !matches!(o, Op::StreamSetAttribute(b) if (b.stream, b.attribute) == (a.stream, a.attribute)),
                );
                self.ops.push(op);
            }
            Op::CtxSetLimit(l) => {
                self.ops.retain(|o| !matches!(o, Op::CtxSetLimit(m) if m.limit == l.limit));
                self.ops.push(op);
            }
            _ => self.ops.push(op),
        }
    }

    /// SHA-256s of the module images the journal loads, each once.
    fn images(&self) -> Vec<Vec<u8>> {
        let loaded = self.ops.iter().filter_map(|o| match o {
            Op::ModuleLoad(m) => Some(m.sha256.to_vec()),
            _ => None,
        });
        loaded.collect::<std::collections::BTreeSet<_>>().into_iter().collect()
    }
}

/// What a session's calls may have written since a migration began to
/// pre-copy its memory: ranges of known copies and memsets, and `all` once
/// a call wrote where it cannot be told (a kernel, a library call, anything
/// not known to write nothing or only a known range).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub all: bool,
    ranges: Vec<(u64, u64)>,
}

/// Ranges a [`Dirty`] keeps before it counts everything as written.
const MAX_DIRTY_RANGES: usize = 4096;

impl Dirty {
    fn add(&mut self, addr: u64, len: u64) {
        if self.all || len == 0 {
            return;
        }
        if self.ranges.len() >= MAX_DIRTY_RANGES {
            self.all = true;
            self.ranges = Vec::new();
            return;
        }
        self.ranges.push((addr, len));
    }

    /// Whether `[addr, addr + len)` may have been written.
    pub fn touches(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        self.all || self.ranges.iter().any(|&(a, l)| a < end && addr < a.saturating_add(l))
    }
}

/// The range a call writes, when it writes one that can be told:
/// `Some(None)` writes nothing the session's memory holds, `Some(Some(r))`
/// writes only `r`, `None` may write anywhere.
fn written<M>(op: &Op, mappings: &std::collections::BTreeMap<u64, (u64, M)>) -> Option<Option<(u64, u64)>> {
    use v1::memcpy_hto_d::Source;
    Some(match op {
        Op::MemcpyHtod(c) => {
            let len = match &c.source {
                Some(Source::Inline(p)) => p.raw_len.max(p.data.len() as u64),
                Some(Source::Staged(s)) => s.size,
                Some(Source::Region(r)) => r.size,
                None => 0,
            };
            Some((c.dst, len))
        }
        Op::MemcpyDtod(c) => Some((c.dst, c.size)),
        Op::Memset(m) => Some((m.dst, u64::from(m.element_size).checked_mul(m.count)?)),
        // A new or freed mapping: its contents are not the ones sent.
        Op::MemMap(m) => Some((m.addr, m.size)),
        Op::MemUnmap(m) => Some((m.addr, mappings.get(&m.addr)?.0)),
        Op::MemcpyDtoh(_)
        | Op::StreamCreate(_)
        | Op::StreamDestroy(_)
        | Op::StreamSynchronize(_)
        | Op::StreamQuery(_)
        | Op::StreamWaitEvent(_)
        | Op::EventCreate(_)
        | Op::EventDestroy(_)
        | Op::EventRecord(_)
        | Op::ContextEvent(_)
        | Op::EventQuery(_)
        | Op::EventSynchronize(_)
        | Op::EventElapsed(_)
        | Op::ContextSynchronize(_)
        | Op::MemGetInfo(_)
        | Op::Occupancy(_)
        | Op::FuncSetAttribute(_)
        | Op::StreamGetAttribute(_)
        | Op::StreamSetAttribute(_)
        | Op::ModuleLoad(_)
        | Op::ModuleUnload(_) => None,
        _ => return None,
    })
}

/// A session whose memory a migration begins to pre-copy: its range and
/// its mappings (address, size) at that moment.
#[derive(Debug)]
pub struct PrecopyStart {
    pub va_base: u64,
    pub va_size: u64,
    pub mappings: Vec<(u64, u64)>,
}

/// A session's state read out for a migration.
#[derive(Debug)]
pub struct Exported {
    /// The calls that re-create it on the target, mappings first.
    pub calls: Vec<v1::Call>,
    /// Calls that run on the target after the contents were written: the
    /// access and references of the application's own VMM allocations.
    pub calls_after: Vec<v1::Call>,
    /// The shadows of the mirrored ranges of mapped host memory, by address
    /// (at most `MAX_MIRROR_BYTES` in all).
    pub mirrors: Vec<(u64, Vec<u8>)>,
    /// Module images the calls load, by SHA-256.
    pub images: Vec<Vec<u8>>,
    /// Each mapping's and module variable's address (the one the client
    /// knows) and size; their contents are read piece by
    /// piece afterwards ([`SessionState::export_memory`]), so that reading,
    /// sending and the target's writing overlap.
    pub memory: Vec<(u64, u64)>,
    /// First address and size of the session's range.
    pub va_base: u64,
    pub va_size: u64,
    /// With a pre-copy: what the session's calls may have written since it
    /// began (pieces sent then and not touched since need not go again).
    pub precopy_dirty: Option<Dirty>,
}

impl Exported {
    /// Device bytes the contents add up to.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.iter().map(|&(_, size)| size).sum()
    }
}

impl<S: BackendSession> SessionState<S> {
    /// Starts a pre-copy: after the device finished what was queued, its
    /// calls' writes are tracked from now on; returns the mappings whose
    /// contents may be read while it keeps running ([`Self::export_memory`]).
    ///
    /// Refused (`NOT_SUPPORTED`, [`Self::movable`]) before anything changes
    /// when the session holds what cannot move: the migration then ends
    /// before the session stops, and its client sees nothing of it.
    pub fn precopy_start(&mut self) -> Result<PrecopyStart, CallError> {
        self.movable()?;
        self.swap_in()?;
        self.dev.synchronize()?;
        self.precopy = Some(Dirty::default());
        Ok(PrecopyStart {
            va_base: self.dev.va_base(),
            va_size: self.limits.va_size,
            mappings: self.mappings.iter().map(|(&addr, &(size, _))| (addr, size)).collect(),
        })
    }

    /// Whether the session can move: refused (`NOT_SUPPORTED`, with the
    /// reason) while it holds what cannot (see the module's documentation).
    pub fn movable(&self) -> Result<(), CallError> {
        let refuse = |what: &str| Err(CallError::not_supported(format!("a session holding {what} cannot migrate")));
        if !self.arrays.is_empty() || !self.objects.is_empty() {
            return refuse("arrays or texture/surface objects");
        }
        if self.globals.any_managed() {
            return refuse("managed module variables (their host half is at the driver's address)");
        }
        if !self.graphs.is_empty() {
            return refuse("graphs with conditional nodes (their handles are the driver's)");
        }
        if self.ipc_shared {
            return refuse("CUDA IPC handles (other sessions on this GPU share its events)");
        }
        Ok(())
    }

    /// Records what `op` may write while a pre-copy runs.
    pub(super) fn note_write(&mut self, op: &Op) {
        let range = written(op, &self.mappings);
        if let Some(dirty) = &mut self.precopy {
            match range {
                Some(Some((addr, len))) => dirty.add(addr, len),
                Some(None) => {}
                None => dirty.all = true,
            }
        }
    }

    /// Reads the session's state out for a migration, after all its device
    /// work; the session itself is unchanged (it keeps running here when
    /// the migration fails). Refused with the reason while it holds what
    /// cannot move (see the module's documentation).
    pub fn export(&mut self) -> Result<Exported, CallError> {
        self.movable()?;
        // Swapped-out contents come back first: they are read as any others.
        self.swap_in()?;
        self.dev.synchronize()?;
        let mut calls = Vec::with_capacity(self.mappings.len() + self.journal.ops.len());
        let mut memory = Vec::with_capacity(self.mappings.len());
        for (&addr, &(size, _)) in &self.mappings {
            memory.push((addr, size));
            calls.push(v1::Call { op: Some(Op::MemMap(v1::MemMap { addr, size })) });
        }
        let vmm = self.vmm_export()?;
        let call = |op| v1::Call { op: Some(op) };
        calls.extend(vmm.before.into_iter().map(call));
        let (mirror_calls, mirrors) = self.mirror_export();
        calls.extend(mirror_calls.into_iter().map(call));
        memory.extend(vmm.contents);
        calls.extend(self.journal.ops.iter().map(|op| v1::Call { op: Some(op.clone()) }));
        // After the modules load: each variable looked up again, at the
        // address the client knows it by; its contents go with the memory.
        for v in self.globals.moved() {
            memory.push((v.client, v.size));
            let at = Some(v.client);
            calls.push(call(Op::ModuleGetGlobal(v1::ModuleGetGlobal { module: v.module, name: v.name, at })));
        }
        Ok(Exported {
            calls,
            calls_after: vmm.after.into_iter().map(call).collect(),
            mirrors,
            images: self.journal.images(),
            memory,
            va_base: self.dev.va_base(),
            va_size: self.limits.va_size,
            precopy_dirty: self.precopy.take(),
        })
    }

    /// Reads `len` bytes of the session's memory at `addr`: only inside one
    /// of its mappings (after an export the session is quiesced: nothing
    /// changes them before the last piece is read; during a pre-copy the
    /// writes since are tracked).
    pub fn export_memory(&mut self, addr: u64, len: u64) -> Result<Vec<u8>, CallError> {
        let addr = self.globals.translate(addr);
        self.check_range(addr, len, ACCESS_READ)?;
        let mut buf = super::swap::host_buffer(len)?;
        self.dev.read(None, addr, &mut buf)?;
        Ok(buf)
    }

    /// Writes migrated contents at `addr`: only inside a mapping the
    /// session made (the migration's `MemMap` calls), as a copy would.
    /// Pre-copied pieces arrive over a while: a session swapped out
    /// meanwhile comes back first, as for a batch.
    pub fn import_memory(&mut self, addr: u64, data: &[u8]) -> Result<(), CallError> {
        self.swap_in()?;
        let addr = self.globals.translate(addr);
        self.check_range(addr, data.len() as u64, ACCESS_READWRITE)?;
        self.dev.write(None, addr, data)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{GRANULARITY as G, code, session};
    use super::*;
    use crate::device::BackendSession;

    fn call(op: Op) -> v1::Call {
        v1::Call { op: Some(op) }
    }

    #[test]
    fn the_journal_keeps_what_lasts_and_forgets_what_was_destroyed() {
        let mut j = Journal::default();
        let stream = |s| Op::StreamCreate(v1::StreamCreate { stream: s, flags: 1, priority: 0 });
        let limit = |v| Op::CtxSetLimit(v1::CtxSetLimit { limit: 1, value: v });
        for op in
            [stream(1), stream(2), limit(4096), limit(8192), Op::EventCreate(v1::EventCreate { event: 3, flags: 0 })]
        {
            j.record(lasting(&op).expect("lasting"));
        }
        let load = |module| {
            let sha256 = vec![7u8; 32].into();
            Op::ModuleLoad(v1::ModuleLoad { module, sha256, image: None, staged: None })
        };
        j.record(load(1));
        j.record(load(2));
        assert_eq!(j.images(), vec![vec![7u8; 32]], "an image loaded twice is sent once");
        j.record(Op::ModuleUnload(v1::ModuleUnload { module: 1 }));
        j.record(Op::ModuleUnload(v1::ModuleUnload { module: 2 }));
        j.record(Op::StreamDestroy(v1::StreamDestroy { stream: 1 }));
        j.record(Op::EventDestroy(v1::EventDestroy { event: 3 }));
        assert_eq!(j.ops, vec![stream(2), limit(8192)]);
        assert!(lasting(&Op::MemMap(v1::MemMap { addr: 0, size: 0 })).is_none());
    }

    /// During a pre-copy the session's calls mark what they may write: a
    /// copy or memset its range, a mapping change its range, a query
    /// nothing, a kernel (or anything not known) everything.
    #[test]
    fn a_pre_copy_tracks_what_calls_may_write() {
        let mut s = session();
        let base = s.va_base();
        let setup = v1::Batch { seq: 1, calls: vec![call(Op::MemMap(v1::MemMap { addr: base, size: 4 * G }))] };
        assert_eq!(s.execute_batch(setup).error_count, 0);
        assert!(s.export().expect("export").precopy_dirty.is_none(), "no pre-copy: nothing tracked");
        let start = s.precopy_start().expect("start");
        assert_eq!(start.mappings, vec![(base, 4 * G)]);
        let memset =
            |addr, count| call(Op::Memset(v1::Memset { dst: addr, value: 1, element_size: 4, count, stream: 0 }));
        let queries = vec![
            call(Op::MemcpyDtoh(v1::MemcpyDtoH { src: base, size: 16, stream: 0, into_region: None })),
            call(Op::ContextSynchronize(v1::ContextSynchronize {})),
            memset(base + G, 4),
            call(Op::MemcpyDtod(v1::MemcpyDtoD { dst: base + 3 * G, src: base, size: 8, stream: 0 })),
        ];
        assert_eq!(s.execute_batch(v1::Batch { seq: 2, calls: queries }).error_count, 0);
        let dirty = s.export().expect("export").precopy_dirty.expect("tracked");
        assert!(!dirty.all);
        assert!(!dirty.touches(base, G), "read, not written");
        assert!(dirty.touches(base + G, 1) && dirty.touches(base + G + 15, 1) && !dirty.touches(base + G + 16, 1));
        assert!(dirty.touches(base + 3 * G, 8) && !dirty.touches(base + 2 * G, G - 1));
        // A launch (here one that fails: it still counts) writes anywhere.
        s.precopy_start().expect("start again");
        let launch = call(Op::Launch(v1::Launch::default()));
        s.execute_batch(v1::Batch { seq: 3, calls: vec![launch] });
        let dirty = s.export().expect("export").precopy_dirty.expect("tracked");
        assert!(dirty.all && dirty.touches(base, 1));
        // Too many ranges count as everything.
        let mut d = Dirty::default();
        for i in 0..=MAX_DIRTY_RANGES as u64 {
            d.add(i * 16, 1);
        }
        assert!(d.all);
    }

    /// A session exported on one device and imported on another at the same
    /// addresses reads the same bytes, with its streams.
    #[test]
    fn export_and_import_keep_addresses_and_contents() {
        let mut a = session();
        let base = a.va_base();
        let data: Vec<u8> = (0..2 * G).map(|i| (i % 251) as u8).collect();
        let setup = v1::Batch {
            seq: 1,
            calls: vec![
                call(Op::MemMap(v1::MemMap { addr: base + G, size: 2 * G })),
                call(Op::StreamCreate(v1::StreamCreate { stream: 5, flags: 0, priority: 0 })),
            ],
        };
        assert_eq!(a.execute_batch(setup).error_count, 0);
        a.import_memory(base + G, &data).expect("write");
        let out = a.export().expect("export");
        assert_eq!(out.va_base, base);
        assert_eq!(out.memory_bytes(), 2 * G);
        // Another device, whose first session has the same range (a target
        // server reserves the source's range).
        let mut b = session();
        assert_eq!(b.va_base(), base);
        let reply = b.execute_batch(v1::Batch { seq: 2, calls: out.calls });
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
        for &(addr, size) in &out.memory {
            // In two pieces, as the transfer sends them.
            for (at, len) in [(addr, size / 2), (addr + size / 2, size - size / 2)] {
                let piece = a.export_memory(at, len).expect("read out");
                b.import_memory(at, &piece).expect("import");
            }
        }
        assert!(a.export_memory(base + 8 * G, 1).is_err(), "outside the session's mappings");
        let mut back = vec![0; data.len()];
        b.dev.read(None, base + G, &mut back).expect("read");
        assert_eq!(back, data);
        assert!(b.streams.contains_key(&5));
        assert!(b.import_memory(base + 8 * G, &[1]).is_err(), "outside the migrated mappings");
    }

    /// Module variables move with their contents and keep the addresses
    /// the client knows them by, though the target's device places them
    /// elsewhere: copies, kernel parameters naming them and the module's
    /// own kernels reach the target's variable. A second move keeps them.
    #[test]
    fn module_variables_move_and_keep_their_addresses() {
        use super::super::tests::{dtoh, global, htod, load_builtin};
        let mut a = session();
        let base = a.va_base();
        let info = load_builtin(&mut a, 1);
        let index = |name: &str| info.functions.iter().position(|f| f.name == name).expect("built-in") as u32;
        let (tally, _) = global(&mut a, 1, "tally").expect("tally");
        assert_eq!(htod(&mut a, tally, &[40, 0, 0, 0, 0, 0, 0, 0]), 0);
        let setup = v1::Batch { seq: 1, calls: vec![call(Op::MemMap(v1::MemMap { addr: base, size: G }))] };
        assert_eq!(a.execute_batch(setup).error_count, 0);
        a.movable().expect("variables no longer keep a session from moving");

        let hop = |from: &mut SessionState<_>, shift: u32| {
            let out = from.export().expect("export");
            // Another device whose driver placed other modules' variables
            // first: this module's land elsewhere.
            let mut to = session();
            for m in 0..shift {
                load_builtin(&mut to, 100 * shift + m);
            }
            let reply = to.execute_batch(v1::Batch { seq: 2, calls: out.calls });
            assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
            for &(addr, size) in &out.memory {
                to.import_memory(addr, &from.export_memory(addr, size).expect("read out")).expect("import");
            }
            to
        };
        let mut b = hop(&mut a, 1);
        let (real, _) = b.dev.module_global(&b.modules[&1].module, "tally").expect("on the device");
        assert_ne!(real, tally, "the target's device placed it elsewhere");
        assert_eq!(global(&mut b, 1, "tally"), Ok((tally, 8)), "known where the client knows it");
        assert_eq!(dtoh(&mut b, tally, 8), Ok(40u64.to_le_bytes().to_vec()), "its contents moved");

        // The module's kernel adds 2 x 1 thread; vector_add reads the
        // variable through a parameter (as two f32s) into the mapping.
        let dims = |x| Some(v1::Dim3 { x, y: 1, z: 1 });
        let launch = |function, params: Vec<u8>| {
            call(Op::Launch(v1::Launch {
                module: 1,
                function,
                grid: dims(1),
                block: dims(1),
                params: params.into(),
                ..Default::default()
            }))
        };
        let mut add = Vec::new();
        for p in [tally, tally, base] {
            add.extend_from_slice(&p.to_le_bytes());
        }
        add.extend_from_slice(&2u32.to_le_bytes());
        let calls = vec![launch(index("tally_add"), 2u64.to_le_bytes().to_vec()), launch(index("vector_add"), add)];
        let reply = b.execute_batch(v1::Batch { seq: 3, calls });
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
        assert_eq!(dtoh(&mut b, tally, 8), Ok(42u64.to_le_bytes().to_vec()));
        let mut doubled = vec![0; 8];
        b.dev.read(None, base, &mut doubled).expect("read");
        let twice: Vec<u8> = 42u64
            .to_le_bytes()
            .chunks(4)
            .flat_map(|w| {
                let x = f32::from_le_bytes(w.try_into().unwrap());
                (x + x).to_le_bytes()
            })
            .collect();
        assert_eq!(doubled, twice, "the kernel read the target's variable through its parameter");

        let mut c = hop(&mut b, 2);
        assert_eq!(dtoh(&mut c, tally, 8), Ok(42u64.to_le_bytes().to_vec()), "a second move");
        assert_eq!(code(c.execute(Op::ModuleUnload(v1::ModuleUnload { module: 1 }))), 0);
        assert!(dtoh(&mut c, tally, 8).is_err(), "gone with its module");
    }

    /// The application's own VMM allocations move: contents, every mapping
    /// (an alias too) with its access, and references (a released handle
    /// that is still mapped stays released).
    #[test]
    fn vmm_allocations_move_with_mappings_access_and_references() {
        use crate::device::{ACCESS_READ, ACCESS_READWRITE};
        let mut a = session();
        let base = a.va_base();
        let data: Vec<u8> = (0..2 * G).map(|i| (i % 253) as u8).collect();
        let (whole, alias, other) = (base + 4 * G, base + 8 * G, base + 12 * G);
        let setup = v1::Batch {
            seq: 1,
            calls: vec![
                call(Op::VmmCreate(v1::VmmCreate { handle: 1, size: 2 * G, compressible: false })),
                call(Op::VmmMap(v1::VmmMap { addr: whole, size: 2 * G, offset: 0, handle: 1 })),
                call(Op::VmmMap(v1::VmmMap { addr: alias, size: G, offset: G, handle: 1 })),
                call(Op::VmmSetAccess(v1::VmmSetAccess { addr: whole, size: 2 * G, flags: ACCESS_READWRITE })),
                call(Op::VmmSetAccess(v1::VmmSetAccess { addr: alias, size: G, flags: ACCESS_READ })),
                // Retained once more (two references).
                call(Op::VmmRetain(v1::VmmRetain { handle: 1 })),
                // A second allocation, released while mapped read-only.
                call(Op::VmmCreate(v1::VmmCreate { handle: 2, size: G, compressible: false })),
                call(Op::VmmMap(v1::VmmMap { addr: other, size: G, offset: 0, handle: 2 })),
                call(Op::VmmSetAccess(v1::VmmSetAccess { addr: other, size: G, flags: ACCESS_READ })),
                call(Op::VmmRelease(v1::VmmRelease { handle: 2 })),
            ],
        };
        let reply = a.execute_batch(setup);
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
        a.import_memory(whole, &data).expect("write");
        let out = a.export().expect("export");
        assert_eq!(out.memory_bytes(), 3 * G, "both allocations' contents");

        let mut b = session();
        let reply = b.execute_batch(v1::Batch { seq: 2, calls: out.calls });
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
        for &(addr, size) in &out.memory {
            let piece = a.export_memory(addr, size).expect("read out (a read-only mapping too)");
            b.import_memory(addr, &piece).expect("import");
        }
        let reply = b.execute_batch(v1::Batch { seq: 3, calls: out.calls_after });
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);

        let mut back = vec![0; data.len()];
        b.dev.read(None, whole, &mut back).expect("read");
        assert_eq!(back, data);
        let mut aliased = vec![0; G as usize];
        b.dev.read(None, alias, &mut aliased).expect("read the alias");
        assert_eq!(aliased[..], data[G as usize..], "the alias shows the second half");
        assert!(b.check_range(alias, G, ACCESS_READWRITE).is_err(), "the alias stays read-only");
        assert!(b.check_range(other, G, ACCESS_READ).is_ok());
        // References: handle 1 takes two releases, handle 2 none.
        let release = |h| call(Op::VmmRelease(v1::VmmRelease { handle: h }));
        let r = b.execute_batch(v1::Batch { seq: 4, calls: vec![release(1), release(1)] });
        assert_eq!(r.error_count, 0, "{:?}", r.errors);
        let r = b.execute_batch(v1::Batch { seq: 5, calls: vec![release(1)] });
        assert_eq!(r.error_count, 1, "a third release of handle 1");
        let r = b.execute_batch(v1::Batch { seq: 6, calls: vec![release(2)] });
        assert_eq!(r.error_count, 1, "handle 2 was released on the source");
    }

    /// Mapped host memory moves with what the client last saw of it: the
    /// device's writes it has not seen yet come back from the target, as
    /// they would have from the source.
    #[test]
    fn mirrored_ranges_move_with_their_shadows() {
        let mut a = session();
        let base = a.va_base();
        let range = base + G;
        let setup = v1::Batch {
            seq: 1,
            calls: vec![
                call(Op::MemMap(v1::MemMap { addr: range, size: G })),
                call(Op::MirrorAdd(v1::MirrorAdd { addr: range, size: 8192 })),
            ],
        };
        assert_eq!(a.execute_batch(setup).error_count, 0);
        // The client wrote its mapped memory, and saw the device's answer...
        a.import_memory(range, &[1; 8192]).expect("host write");
        a.mirrors.note_host_write(range, &[1; 8192]);
        // ...then the device wrote again, not yet returned to the client.
        a.import_memory(range + 4096, &[2; 16]).expect("device write");
        let out = a.export().expect("export");
        assert_eq!(out.mirrors.len(), 1);

        let mut b = session();
        let reply = b.execute_batch(v1::Batch { seq: 2, calls: out.calls });
        assert_eq!(reply.error_count, 0, "{:?}", reply.errors);
        for &(addr, size) in &out.memory {
            b.import_memory(addr, &a.export_memory(addr, size).expect("read out")).expect("import");
        }
        for (addr, shadow) in &out.mirrors {
            b.import_mirror(*addr, shadow).expect("shadow");
        }
        let changes = b.mirror_changes();
        assert_eq!(changes.len(), 1, "{changes:?}");
        // In 4 KiB chunks: the one the unseen device write is in.
        assert_eq!((changes[0].addr, changes[0].size), (range + 4096, 4096), "only the unseen device write");
        assert_eq!(changes[0].data[..16], [2; 16]);
        assert!(changes[0].data[16..].iter().all(|&b| b == 1));
        assert!(b.import_mirror(range + 8190, &[0; 4]).is_err(), "past the range");
        assert!(b.import_mirror(base, &[0; 4]).is_err(), "in no range");
    }

    /// An allocation whose only whole mapping cannot be read is not read
    /// out by changing its access: the session refuses to move.
    #[test]
    fn a_vmm_allocation_without_a_readable_whole_mapping_refuses_to_move() {
        let mut a = session();
        let base = a.va_base();
        let setup = v1::Batch {
            seq: 1,
            calls: vec![
                call(Op::VmmCreate(v1::VmmCreate { handle: 1, size: G, compressible: false })),
                call(Op::VmmMap(v1::VmmMap { addr: base + G, size: G, offset: 0, handle: 1 })),
            ],
        };
        assert_eq!(a.execute_batch(setup).error_count, 0);
        let e = a.export().expect_err("no readable whole mapping");
        assert!(e.message.contains("read access"), "{}", e.message);
    }
}
