//! The testkit's conformance suite and state-machine property test on every
//! backend: real PostgreSQL, a real SQLite file, SQLite in memory, real MariaDB.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

#[cfg(feature = "postgres")]
mod postgres {
    impersonation_testkit::store_conformance_tests!(super::common::postgres());
}

mod sqlite_file {
    impersonation_testkit::store_conformance_tests!(super::common::sqlite_file());
}

mod sqlite_memory {
    impersonation_testkit::store_conformance_tests!(super::common::sqlite_memory());
}

#[cfg(feature = "mysql")]
mod mariadb {
    impersonation_testkit::store_conformance_tests!(super::common::mysql());
}

/// Two stores, each with its own pool, on one database: two processes of
/// an app. (SQLite in memory is one process's own.)
mod two_instances {
    #[cfg(feature = "postgres")]
    mod postgres {
        impersonation_testkit::store_pair_conformance_tests!(super::super::common::postgres_pair());
    }

    mod sqlite_file {
        impersonation_testkit::store_pair_conformance_tests!(
            super::super::common::sqlite_file_pair()
        );
    }

    #[cfg(feature = "mysql")]
    mod mariadb {
        impersonation_testkit::store_pair_conformance_tests!(super::super::common::mysql_pair());
    }
}
