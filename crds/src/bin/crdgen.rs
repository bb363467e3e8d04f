//! Writes `crds/*.yaml` and the chart's copy `charts/shardfarm/crds/*.yaml` from the CRD
//! types (or prints them all with `--stdout`).
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let stdout = std::env::args().any(|a| a == "--stdout");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chart = dir.join("../charts/shardfarm/crds");
    for (file, crd) in shardfarm_crds::all() {
        let yaml = shardfarm_crds::to_yaml(&crd);
        if stdout {
            println!("---\n{yaml}");
        } else {
            std::fs::write(dir.join(file), &yaml)?;
            std::fs::create_dir_all(&chart)?;
            std::fs::write(chart.join(file), &yaml)?;
            eprintln!("wrote crds/{file} and charts/shardfarm/crds/{file}");
        }
    }
    Ok(())
}
