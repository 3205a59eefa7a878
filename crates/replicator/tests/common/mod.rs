//! Test helpers: the remote phones sync with (an embedded store or a
//! database on a real pouchdb-server, from `rewind-testkit`).
#![allow(dead_code)]

use std::path::Path;

use rewind_replicator::Phone;
use rewind_store::{AnyStore, Store};
pub use rewind_testkit::{unique, PouchServer, TempDir};

/// The database phones sync with: its URL (or path) and an open handle.
pub struct Remote {
    pub url: String,
    pub store: AnyStore,
    _dir: Option<TempDir>,
}

impl Remote {
    /// An embedded store standing in for the server.
    pub async fn embedded() -> Remote {
        let dir = TempDir::new();
        let url = dir.path().join("server.db").display().to_string();
        let store = rewind_store::open(&url).await.unwrap();
        Remote {
            url,
            store,
            _dir: Some(dir),
        }
    }

    /// A fresh database on the shared pouchdb-server.
    pub async fn pouch() -> Remote {
        let url = format!("{}/{}", server().url, unique("r"));
        let store = rewind_store::open(&url).await.unwrap();
        store.create_db().await.unwrap();
        Remote {
            url,
            store,
            _dir: None,
        }
    }

    /// A phone with a fresh local store syncing with this remote (sharing
    /// the open handle: an embedded store is opened once per process).
    pub async fn phone(&self, name: &str) -> Phone {
        Phone::new(name, &self.url)
            .await
            .unwrap()
            .with_remote(self.store.clone())
    }

    /// A phone over an existing local file.
    pub async fn phone_at(&self, name: &str, local: &Path) -> Phone {
        Phone::open(name, local, &self.url)
            .await
            .unwrap()
            .with_remote(self.store.clone())
    }
}

/// The pouchdb-server shared by the tests of this binary (admin party).
pub fn server() -> &'static PouchServer {
    rewind_testkit::shared_server()
}

/// Runs one scenario against an embedded remote and a pouchdb-server remote.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                let remote = $crate::common::Remote::embedded().await;
                super::$name(&remote).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn pouchdb_server() {
                let remote = $crate::common::Remote::pouch().await;
                super::$name(&remote).await;
            }
        }
    )*};
}
