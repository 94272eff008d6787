//! User objects (`cuUserObjectCreate`, `cuUserObjectRetain`/`Release`,
//! `cuGraphRetainUserObject`/`ReleaseUserObject`): a program's resource
//! whose destructor CUDA calls once no reference is left, references held
//! by the program and by graphs.
//!
//! All bookkeeping is the stub's own, beside its client-side graphs: a
//! graph's references are released when it is destroyed; a clone and an
//! executable graph take their own copies of those of the graph they come
//! from (child graphs' included); an executable graph's go when it is
//! destroyed, and are replaced by the new graph's when it is updated from
//! one (`cuGraphExecUpdate`). A destructor runs on a thread of the stub's, as CUDA runs it
//! on a shared internal thread, after the work queued before the last
//! release has finished (launches of a destroyed executable graph that
//! held the object included), never inside the API call that released it.

use crate::abi::{CuError, CuResult, put};
use crate::graph::Id;
use crate::runtime::{Runtime, Tag, handle, id_of};
use cudarc::driver::sys::{CUgraph, CUhostFn, CUuserObject};
use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};

/// `CU_USER_OBJECT_NO_DESTRUCTOR_SYNC`, the one flag (required).
const NO_DESTRUCTOR_SYNC: c_uint = 1;
/// `CU_GRAPH_USER_OBJECT_MOVE`.
const MOVE: c_uint = 1;
/// Largest count one call may retain or release (CUDA's bound).
const MAX_COUNT: c_uint = i32::MAX as c_uint;

#[derive(Debug)]
struct Object {
    ptr: usize,
    destroy: unsafe extern "C" fn(*mut c_void),
    refs: u64,
}

/// Every user object of the process, and the references graphs and
/// executable graphs (`Id`s of one space) own.
#[derive(Debug, Default)]
struct Objects {
    next: u64,
    objects: HashMap<u64, Object>,
    owned: HashMap<Id, HashMap<u64, u64>>,
}

fn objects() -> MutexGuard<'static, Objects> {
    static OBJECTS: OnceLock<Mutex<Objects>> = OnceLock::new();
    OBJECTS.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A destructor to call, and its argument.
struct Destructor(unsafe extern "C" fn(*mut c_void), usize);

/// Destructors waiting for their thread; a release past this many waits
/// for room (each object is destroyed once, so only a program releasing
/// that many at once meets it).
const QUEUED_DESTRUCTORS: usize = 1 << 16;

/// Hands `d` to the destructor thread (started at the first one).
fn schedule(d: Destructor) {
    static THREAD: OnceLock<Mutex<mpsc::SyncSender<Destructor>>> = OnceLock::new();
    let tx = THREAD.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel::<Destructor>(QUEUED_DESTRUCTORS);
        let spawned = std::thread::Builder::new().name("gpupool-user-objects".into()).spawn(move || {
            for Destructor(f, ptr) in rx {
                // The work queued before the release (a launch of the
                // graph that held the object) finishes first.
                if let Ok(rt) = Runtime::get()
                    && let Err(e) = rt.session.synchronize()
                {
                    tracing::debug!(error = %e, "user object destructor: the session could not be synchronized");
                }
                // SAFETY: the program's destructor with the pointer it gave
                // for it (cuUserObjectCreate's contract).
                unsafe { f(ptr as *mut c_void) };
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for user object destructors: they will not run");
        }
        Mutex::new(tx)
    });
    let _ = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).send(d);
}

impl Objects {
    /// Drops `count` references of object `o`; its destructor once none is
    /// left.
    fn release(&mut self, o: u64, count: u64) -> CuResult<Option<Destructor>> {
        let obj = self.objects.get_mut(&o).ok_or(CuError::INVALID_VALUE)?;
        if count > obj.refs {
            return Err(CuError::INVALID_VALUE);
        }
        obj.refs -= count;
        if obj.refs > 0 {
            return Ok(None);
        }
        let obj = self.objects.remove(&o).expect("present");
        Ok(Some(Destructor(obj.destroy, obj.ptr)))
    }

    fn retain(&mut self, o: u64, count: u64) -> CuResult {
        let obj = self.objects.get_mut(&o).ok_or(CuError::INVALID_VALUE)?;
        obj.refs = obj.refs.checked_add(count).ok_or(CuError::INVALID_VALUE)?;
        Ok(())
    }
}

fn object_id(h: CUuserObject) -> CuResult<u64> {
    id_of(Tag::UserObject, h as usize).ok_or(CuError::INVALID_VALUE)
}

fn count_of(count: c_uint) -> CuResult<u64> {
    if count == 0 || count > MAX_COUNT {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(u64::from(count))
}

/// Graph `to` (a clone, or an executable graph) takes copies of the
/// references the graphs `from` own, in place of its own (an executable
/// graph updated from another graph: `cuGraphExecUpdate`); those it held
/// go after the new ones are taken, so an object both name lives on.
pub(crate) fn copy_references(from: &[Id], to: Id) {
    take_references(from, to, true);
}

/// Graph `to` takes copies of the references the graphs `from` own beside
/// its own (an executable graph's child graph node set to another graph:
/// the old child's stay until the executable graph goes, never released
/// early).
pub(crate) fn add_references(from: &[Id], to: Id) {
    take_references(from, to, false);
}

fn take_references(from: &[Id], to: Id, replace: bool) {
    let due = {
        let mut objs = objects();
        let mut taken: HashMap<u64, u64> = HashMap::new();
        for g in from {
            for (&o, &n) in objs.owned.get(g).into_iter().flatten() {
                *taken.entry(o).or_default() += n;
            }
        }
        for (&o, &n) in &taken {
            // Every owned reference names a live object.
            let _ = objs.retain(o, n);
        }
        let before = if !replace {
            let held = objs.owned.entry(to).or_default();
            for (o, n) in taken {
                *held.entry(o).or_default() += n;
            }
            None
        } else if taken.is_empty() {
            objs.owned.remove(&to)
        } else {
            objs.owned.insert(to, taken)
        };
        let mut due = Vec::new();
        for (o, n) in before.unwrap_or_default() {
            if let Ok(Some(d)) = objs.release(o, n) {
                due.push(d);
            }
        }
        due
    };
    due.into_iter().for_each(schedule);
}

/// Graphs or an executable graph `owners` are gone: their references go
/// with them.
pub(crate) fn owners_gone(owners: &[Id]) {
    let mut due = Vec::new();
    {
        let mut objs = objects();
        for owner in owners {
            for (o, n) in objs.owned.remove(owner).unwrap_or_default() {
                if let Ok(Some(d)) = objs.release(o, n) {
                    due.push(d);
                }
            }
        }
    }
    due.into_iter().for_each(schedule);
}

crate::exports! {
    fn cuUserObjectCreate(out: *mut CUuserObject, ptr: *mut c_void, destroy: CUhostFn, initial: c_uint, flags: c_uint) {
        Runtime::get()?;
        let destroy = destroy.ok_or(CuError::INVALID_VALUE)?;
        if out.is_null() || flags != NO_DESTRUCTOR_SYNC {
            return Err(CuError::INVALID_VALUE);
        }
        let refs = count_of(initial)?;
        let id = {
            let mut objs = objects();
            objs.next += 1;
            let id = objs.next;
            objs.objects.insert(id, Object { ptr: ptr as usize, destroy, refs });
            id
        };
        // SAFETY: non-null out-pointer.
        unsafe { put(out, handle(Tag::UserObject, id) as CUuserObject) }
    }

    fn cuUserObjectRetain(object: CUuserObject, count: c_uint) {
        Runtime::get()?;
        objects().retain(object_id(object)?, count_of(count)?)
    }

    fn cuUserObjectRelease(object: CUuserObject, count: c_uint) {
        Runtime::get()?;
        let due = objects().release(object_id(object)?, count_of(count)?)?;
        due.into_iter().for_each(schedule);
        Ok(())
    }

    fn cuGraphRetainUserObject(graph: CUgraph, object: CUuserObject, count: c_uint, flags: c_uint) {
        Runtime::get()?;
        let g = crate::graph_api::graph_id(graph)?;
        crate::capture::state().store.graph(g)?;
        let (o, n) = (object_id(object)?, count_of(count)?);
        if flags & !MOVE != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let mut objs = objects();
        if !objs.objects.contains_key(&o) {
            return Err(CuError::INVALID_VALUE);
        }
        // A move hands over the caller's references; else new ones.
        if flags & MOVE == 0 {
            objs.retain(o, n)?;
        }
        *objs.owned.entry(g).or_default().entry(o).or_default() += n;
        Ok(())
    }

    fn cuGraphReleaseUserObject(graph: CUgraph, object: CUuserObject, count: c_uint) {
        Runtime::get()?;
        let g = crate::graph_api::graph_id(graph)?;
        let (o, n) = (object_id(object)?, count_of(count)?);
        let due = {
            let mut objs = objects();
            let held = objs.owned.get_mut(&g).and_then(|m| m.get_mut(&o)).ok_or(CuError::INVALID_VALUE)?;
            if *held < n {
                return Err(CuError::INVALID_VALUE);
            }
            *held -= n;
            if *held == 0 {
                let refs = objs.owned.get_mut(&g).expect("present");
                refs.remove(&o);
                if refs.is_empty() {
                    objs.owned.remove(&g);
                }
            }
            objs.release(o, n)?
        };
        due.into_iter().for_each(schedule);
        Ok(())
    }
}
