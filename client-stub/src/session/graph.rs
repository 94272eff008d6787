//! CUDA graphs with conditional nodes on a [`Session`]: such a graph runs
//! as a real driver graph on the server (the condition is set by device
//! code through a handle only the driver reads). Graphs and execs are
//! named by ids the caller chooses; handle creation and instantiation wait
//! for the server's answer (a refused graph fails the call that made it),
//! launches and destructions are queued.

use super::{Session, StreamId};
use crate::error::{ClientError, Result};
use gpupool_proto::v1::{self, call::Op, call_result::Value};

impl Session {
    /// `cuGraphConditionalHandleCreate` on the server's driver graph for
    /// client graph `graph` (made on first use): the driver's handle.
    pub fn graph_handle_create(&self, graph: u64, default_value: u32, flags: u32) -> Result<u64> {
        let mut st = self.lock();
        let op = Op::GraphHandleCreate(v1::GraphHandleCreate { graph, default_value, flags });
        match self.call(&mut st, op)? {
            Some(Value::ConditionalHandle(h)) => Ok(h),
            other => Err(ClientError::Protocol(format!("unexpected conditional handle result {other:?}"))),
        }
    }

    /// Builds `body` into the driver graph of client graph `graph` and
    /// instantiates it as exec `exec`.
    pub fn graph_instantiate(&self, graph: u64, exec: u64, flags: u64, body: v1::GraphBody) -> Result<()> {
        let mut st = self.lock();
        let op = Op::GraphInstantiate(v1::GraphInstantiate { graph, exec, flags, body: Some(body) });
        self.call(&mut st, op).map(drop)
    }

    /// Launches exec `exec` on stream `s`, queued.
    pub fn graph_launch(&self, exec: u64, s: StreamId) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::GraphLaunch(v1::GraphLaunch { exec, stream: s.0 }))
    }

    /// Frees exec `exec` on the server, queued.
    pub fn graph_exec_destroy(&self, exec: u64) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::GraphExecDestroy(v1::GraphExecDestroy { exec }))
    }

    /// Frees the driver graph of client graph `graph` and its handles, queued.
    pub fn graph_destroy(&self, graph: u64) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::GraphDestroy(v1::GraphDestroy { graph }))
    }
}
