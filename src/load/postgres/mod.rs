//! Postgres target.
//!
//! Every run works in ONE transaction on the target, so a failed or killed
//! run leaves the table exactly as it was. Two ways in:
//!
//! - **First load** (`first_load.rs`; the table is created by this run, or
//!   exists and is empty): pages are `COPY`ed straight into the table, each
//!   under a savepoint, with no staging and no merge. A duplicate key (the
//!   primary key refuses the page) or, with `deletes = hard|ignore`, deleted
//!   rows send the rest of the extract to staging, which the commit merges
//!   in, the highest cursor winning. That needs the cursor in the table: a
//!   mapped `timestamp` column equal to the cursor, checked page by page;
//!   without one the first load stages everything.
//! - **Merge** (`merge.rs`; the table has rows): pages are `COPY`ed into a
//!   temp staging table; the commit renders the merge of `load/merge.rs`.
//!
//! COPY data is binary, rendered column-typed (`copy.rs`). Table types and
//! DDL are in `ddl.rs`.

mod copy;
mod ddl;
mod first_load;
mod merge;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

use super::merge::{Evolution, MergePlan};
use super::{LoadCounts, LoadError, Target, quote_ident};
use crate::hooks::SharedHooks;
use crate::schema::MappedPage;
use first_load::FirstLoad;

/// How long connecting (TCP, startup, authentication) may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct PostgresTarget {
    connection: String,
    client: Client,
    driver: JoinHandle<()>,
    schema_name: Option<String>,
    table_name: String,
    run: Option<RunState>,
    /// A transaction is open on the connection (BEGIN sent, no COMMIT yet).
    in_transaction: bool,
    hooks: SharedHooks,
}

/// What `prepare` learned, used by `stage` and `commit`.
struct RunState {
    plan: MergePlan,
    stage: String,
    evolution: Evolution,
    /// The staging table exists.
    stage_ready: bool,
    /// Rows staged, and how many of them are deleted records.
    staged_rows: u64,
    staged_deleted: u64,
    /// Set when this run is a first load (transaction open since `prepare`).
    first: Option<FirstLoad>,
}

impl PostgresTarget {
    pub async fn connect(
        connection: &str,
        url: &str,
        schema_name: Option<String>,
        table: &str,
        hooks: SharedHooks,
    ) -> Result<PostgresTarget, LoadError> {
        let label = match &schema_name {
            Some(s) => format!("{s}.{table}"),
            None => table.to_string(),
        };
        let target = format!("postgres `{connection}` table {label}");
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| LoadError::Connect {
            target: target.clone(),
            message: format!("the url does not parse: {e}"),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // Shows in pg_stat_activity, so a DBA sees who holds a lock;
        // `prepare` adds the run.
        if config.get_application_name().is_none() {
            config.application_name("nightjar");
        }
        // The URL carries the password: report the driver's message only.
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls)).await;
        let (client, driver) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => {
                return Err(LoadError::Connect { target, message: format!("cannot connect: {e}") });
            }
            Err(_) => {
                return Err(LoadError::Connect {
                    target,
                    message: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        };
        let driver = tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::warn!(error = %e, "postgres connection closed with an error");
            }
        });
        Ok(PostgresTarget {
            connection: connection.to_string(),
            client,
            driver,
            schema_name,
            table_name: table.to_string(),
            run: None,
            in_transaction: false,
            hooks,
        })
    }

    fn name(&self) -> String {
        format!("postgres `{}` table {}", self.connection, self.label())
    }

    fn label(&self) -> String {
        match &self.schema_name {
            Some(s) => format!("{s}.{}", self.table_name),
            None => self.table_name.clone(),
        }
    }

    fn err(&self) -> impl Fn(tokio_postgres::Error) -> LoadError + use<> {
        let target = self.name();
        move |e| pg_error(&target, &e)
    }

    fn qualified(&self) -> String {
        match &self.schema_name {
            Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&self.table_name)),
            None => quote_ident(&self.table_name),
        }
    }

    async fn sql(&self, sql: &str) -> Result<(), LoadError> {
        self.client.batch_execute(sql).await.map_err(self.err())
    }

    async fn begin(&mut self) -> Result<(), LoadError> {
        self.sql("BEGIN").await?;
        self.in_transaction = true;
        Ok(())
    }

    async fn commit_transaction(&mut self) -> Result<(), LoadError> {
        self.sql("COMMIT").await?;
        self.in_transaction = false;
        Ok(())
    }
}

/// A driver error as a [`LoadError`] carrying its SQLSTATE (which decides
/// the class) and the server's own message with detail.
fn pg_error(target: &str, e: &tokio_postgres::Error) -> LoadError {
    let message = match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        },
        None => e.to_string(),
    };
    LoadError::Postgres {
        target: target.to_string(),
        message,
        sqlstate: e.code().map(|c| c.code().to_string()),
        // A closed session or a failed socket is the network's doing.
        closed: e.is_closed()
            || std::error::Error::source(e).is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()),
    }
}

fn copy_error(target: &str, e: copy::CopyError) -> LoadError {
    match e {
        copy::CopyError::Db(e) => pg_error(target, &e),
        copy::CopyError::Value(message) => LoadError::Internal { target: target.to_string(), message },
    }
}

#[async_trait]
impl Target for PostgresTarget {
    async fn prepare(&mut self, plan: &MergePlan) -> Result<(), LoadError> {
        let table = self.qualified();
        let name: String = format!("nightjar run {} into {}", plan.run, self.label()).chars().take(63).collect();
        self.client.execute("SELECT set_config('application_name', $1, false)", &[&name]).await.map_err(self.err())?;
        let existing = self.existing_columns().await?;
        let mut state = RunState {
            plan: plan.clone(),
            stage: format!("_nightjar_stage_{}", plan.run),
            evolution: Evolution::default(),
            stage_ready: false,
            staged_rows: 0,
            staged_deleted: 0,
            first: None,
        };
        if existing.is_empty() {
            if !plan.create {
                return Err(LoadError::Setup {
                    target: self.name(),
                    message:
                        "the table does not exist and the job has `create = false`; create it or set `create = true`"
                            .into(),
                });
            }
            // Created inside the load's transaction: a failed first load
            // leaves no table behind, let alone rows.
            self.begin().await?;
            self.create_table(plan).await?;
            state.first = Some(self.start_first_load().await?);
        } else {
            let evolution = plan.evolution(&self.name(), "table", &existing, |t| ddl::reported_type(t).to_string())?;
            // Writers wait while the table is checked (and, if empty, loaded);
            // readers never do.
            self.begin().await?;
            self.sql(&format!("LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")).await?;
            let has_rows: bool = self
                .client
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
                .await
                .map_err(self.err())?
                .get(0);
            if has_rows {
                self.commit_transaction().await?;
                state.evolution = evolution;
                self.create_stage(&mut state).await?;
            } else {
                self.evolve(&evolution).await?;
                state.first = Some(self.start_first_load().await?);
            }
        }
        self.run = Some(state);
        Ok(())
    }

    async fn stage(&mut self, page: MappedPage) -> Result<(), LoadError> {
        let name = self.name();
        let mut state = self
            .run
            .take()
            .ok_or_else(|| LoadError::Internal { target: name, message: "stage before prepare".into() })?;
        let number = page.number;
        let result = if page.height() == 0 {
            Ok(())
        } else if state.first.is_some() {
            self.stage_first_load(&mut state, &page).await
        } else {
            self.stage_rows(&mut state, &page).await
        };
        self.run = Some(state);
        if result.is_ok() {
            self.hooks.reached(crate::hooks::HookPoint::PageStaged(number));
        }
        result
    }

    async fn commit(&mut self) -> Result<LoadCounts, LoadError> {
        let name = self.name();
        let mut state = self
            .run
            .take()
            .ok_or_else(|| LoadError::Internal { target: name, message: "commit before prepare".into() })?;
        let result = match state.first.take() {
            Some(first) => self.commit_first_load(&state, &first).await,
            None => self.commit_merge(&state).await,
        };
        if result.is_err() && self.in_transaction {
            self.in_transaction = false;
            if let Err(e) = self.client.batch_execute("ROLLBACK").await {
                tracing::warn!(error = %e, "rolling back the failed commit also failed");
            }
        }
        result
    }

    async fn abort(&mut self) -> Result<(), LoadError> {
        let state = self.run.take();
        if self.in_transaction {
            self.in_transaction = false;
            // Everything of a first load, staging included, goes with it.
            self.sql("ROLLBACK").await?;
        } else if let Some(state) = state
            && state.stage_ready
        {
            self.sql(&format!("DROP TABLE IF EXISTS pg_temp.{}", quote_ident(&state.stage))).await?;
        }
        Ok(())
    }
}

impl Drop for PostgresTarget {
    fn drop(&mut self) {
        // The client's drop closes the session (rolling back an open
        // transaction); the driver task then ends on its own, but there is no
        // reason to keep it scheduled.
        self.driver.abort();
    }
}
