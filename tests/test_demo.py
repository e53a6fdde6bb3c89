from sbi_fm_plugin import demo


def test_demo_prints_a_summary_and_saves_a_pairplot(tmp_path, capsys):
    image = tmp_path / "pairplot.png"
    demo.main(num_simulations=500, num_sbc_datasets=20, image=image)

    output = capsys.readouterr().out
    assert "C2ST against exact samples" in output
    assert "KS p-values of the ranks" in output
    assert image.stat().st_size > 0
