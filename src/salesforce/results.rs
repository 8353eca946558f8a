//! A query job's results as a stream of pages: the paging loop
//! (`Sforce-Locator`), and the checks that make a stream trustworthy.
//!
//! The stream ends when Salesforce says so (`Sforce-Locator: null`); the
//! caller then compares the rows it received with the job's
//! `numberRecordsProcessed` ([`ResultPages::reported`]). Along the way a
//! stream that repeats a locator (it would never end), goes past the rows
//! the job reported, or sends an empty page that claims more follow, is a
//! protocol error at once.

use std::collections::HashSet;

use super::{JobInfo, Page, RunClient, SalesforceError};

pub struct ResultPages {
    client: RunClient,
    job_id: String,
    page_size: u32,
    /// The locator of the next page; `None` for the first page.
    locator: Option<String>,
    done: bool,
    /// Pages returned so far.
    pages: u32,
    /// Locators already followed, to catch a loop.
    followed: HashSet<String>,
    rows: u64,
    reported: Option<u64>,
}

impl ResultPages {
    /// The results of `job` (complete), `page_size` rows per page at most.
    pub fn new(client: &RunClient, job: &JobInfo, page_size: u32) -> ResultPages {
        ResultPages {
            client: client.clone(),
            job_id: job.id.clone(),
            page_size,
            locator: None,
            done: false,
            pages: 0,
            followed: HashSet::new(),
            rows: 0,
            reported: job.number_records_processed,
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Rows the job said it produced (`numberRecordsProcessed`).
    pub fn reported(&self) -> Option<u64> {
        self.reported
    }

    /// Rows received so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The next page, or `None` after the last one.
    pub async fn next_page(&mut self) -> Result<Option<Page>, SalesforceError> {
        if self.done {
            return Ok(None);
        }
        let number = self.pages + 1;
        let page = self.client.results_page(&self.job_id, self.locator.as_deref(), self.page_size, number).await?;
        let protocol = |message: String| SalesforceError::Protocol {
            context: format!("reading the results of query job {}", self.job_id),
            message,
        };
        self.pages = number;
        self.rows += page.frame.height() as u64;
        if let Some(reported) = self.reported
            && self.rows > reported
        {
            return Err(protocol(format!(
                "pages 1 to {number} hold {} rows, more than the {reported} the job reported (numberRecordsProcessed)",
                self.rows
            )));
        }
        match &page.next_locator {
            None => self.done = true,
            Some(next) => {
                if page.frame.height() == 0 {
                    return Err(protocol(format!("page {number} is empty but names a next page (locator `{next}`)")));
                }
                let repeated = self.locator.as_deref() == Some(next.as_str()) || !self.followed.insert(next.clone());
                if repeated {
                    return Err(protocol(format!(
                        "page {number} names locator `{}` as the next page, which was already read: the results loop",
                        next.escape_debug()
                    )));
                }
                self.locator = Some(next.clone());
            }
        }
        Ok(Some(page))
    }
}
