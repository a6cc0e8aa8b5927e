//! openraft's own storage test suite, unmodified, against the WAL-backed log store and the
//! image-backed state machine, on real files through both disk backends. (openraft 0.10's suite
//! lives in `openraft::testing::log` and is async: it runs on a multi-threaded runtime, as the
//! stores hand blocking work to tokio's blocking pool.)

use openraft::testing::log::{StoreBuilder, Suite};
use xdevice::replication::log_store::{LogStore, DEFAULT_CACHE_BYTES};
use xdevice::replication::open_replica;
use xdevice::replication::state_machine::StateMachine;
use xdevice::replication::types::{StorageError, TypeConfig};
use xdevice::storage::disk::{Backend, DirVolume, Volume};
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions};
use xdevice::storage::layout::Location;

struct Builder {
    backend: Backend,
    cache_bytes: usize,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = DirVolume::open(dir.path(), self.backend).expect("volume");
        let location = Location::Directory {
            volume: std::sync::Arc::new(volume) as std::sync::Arc<dyn Volume>,
            name: "suite".into(),
        };
        // Every store the suite builds is a replica of one device: the suite installs a
        // snapshot built on one on another, and a snapshot of another cluster is refused.
        let opts = FormatOptions {
            device_name: "suite".into(),
            device_bytes: Some(4 << 20),
            segment_bytes: 16 << 20,
            cluster_id: uuid::Uuid::from_u128(0x5017e),
            ..FormatOptions::default()
        };
        Engine::format(&location, &opts).expect("format");
        let replica =
            open_replica(&location, EngineConfig::default(), dir.path(), self.cache_bytes)
                .expect("open replica");
        Ok((dir, replica.log, replica.sm))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn openraft_suite_uring_backend() {
    Suite::test_all(Builder { backend: Backend::Uring, cache_bytes: DEFAULT_CACHE_BYTES })
        .await
        .expect("openraft storage suite");
}

/// With a one-byte entry cache every read goes to the WAL on disk.
#[tokio::test(flavor = "multi_thread")]
async fn openraft_suite_file_backend_without_cache() {
    Suite::test_all(Builder { backend: Backend::File, cache_bytes: 1 })
        .await
        .expect("openraft suite");
}
