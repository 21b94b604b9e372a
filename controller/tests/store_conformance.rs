//! The store conformance suite against both backends: SQLite (embedded) and PostgreSQL
//! (a fresh database per test; requires PostgreSQL, provisioned by `make test`).

mod sqlite {
    meridian_controller::store_conformance_suite!(async {
        meridian_controller::store::open(&meridian_controller::testing::fresh_sqlite_url())
            .await
            .expect("open SQLite store")
    });
}

mod postgres {
    meridian_controller::store_conformance_suite!(async {
        let url = meridian_controller::testing::fresh_postgres_url().await;
        meridian_controller::store::open(&url).await.expect("open PostgreSQL store")
    });
}
